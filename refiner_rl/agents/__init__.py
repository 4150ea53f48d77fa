"""ImageEdit-R1 style planning (arXiv 2603.08059): a VLM splits an instruction into atomic edits, a frozen editor
applies them one by one.

- :mod:`~refiner_rl.agents.plan`: the ``<action>/<subject>/<goal>`` format, parsing.
- :mod:`~refiner_rl.agents.rewards`: text-only TRL reward functions (format, F1 of each component).
- :mod:`~refiner_rl.agents.data`: decomposition records and their TRL conversational VLM form.
- :mod:`~refiner_rl.agents.train`: ``refiner-rl planner`` (TRL's ``GRPOTrainer``).
- :mod:`~refiner_rl.agents.pipeline`, :mod:`~refiner_rl.agents.editor`, :mod:`~refiner_rl.agents.cli`:
  ``refiner-rl edit`` (decompose, sequence, edit); :mod:`~refiner_rl.agents.evaluate`: planner vs no planner.

Import the rewards from here to pass them to ``trl.GRPOTrainer``::

    from refiner_rl.agents import plan_format_reward, action_f1_reward, subject_f1_reward, goal_f1_reward
"""

from refiner_rl.agents.plan import format_plan, parse_plan
from refiner_rl.agents.rewards import (
    action_f1_reward,
    goal_f1_reward,
    make_decomposition_reward,
    make_f1_reward,
    plan_format_partial_reward,
    plan_format_reward,
    subject_f1_reward,
)

__all__ = [
    "action_f1_reward",
    "format_plan",
    "goal_f1_reward",
    "make_decomposition_reward",
    "make_f1_reward",
    "parse_plan",
    "plan_format_partial_reward",
    "plan_format_reward",
    "subject_f1_reward",
]
