"""Built-in reward plug-ins, one per file (installed as ``refiner_rl.rewards``).

Each module defines a :class:`refiner_rl.scoring.Reward` subclass decorated with
``@register_reward``; :func:`refiner_rl.scoring.registry.available_rewards` imports every module of this
package, so a new file here is picked up without editing this one. Heavy dependencies (model weights) are
loaded by the reward's constructor, never at import. See ``rewards/README.md``.
"""
