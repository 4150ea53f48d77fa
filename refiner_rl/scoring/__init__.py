"""Reward interface, registry, batch scoring and aggregation (the trainers call these; plug-ins live in ``rewards/``).

- :mod:`refiner_rl.scoring.base`: the :class:`Reward` base class and :func:`score_safely` (one reward);
- :mod:`refiner_rl.scoring.functions`: :class:`FunctionReward`, a plain TRL reward function as a reward;
- :mod:`refiner_rl.scoring.registry`: ``@register_reward``, entry points, dotted paths, :func:`split_weights`
  and :func:`build_reward_funcs` (rewards from specs, instances and functions);
- :mod:`refiner_rl.scoring.batch`: :func:`score_batch`, every reward on one batch (async ones concurrently, on
  the background event loop of :mod:`refiner_rl.scoring.loop`);
- :mod:`refiner_rl.scoring.aggregate`: ``weighted_total``, ``compute_advantages`` (sum or GDPO) and
  ``spatial_advantages``;
- :mod:`refiner_rl.scoring.patches`: patch grids, mask boxes and reward maps shared by patch-wise rewards.
"""

from refiner_rl.scoring.aggregate import (
    AdvantageResult,
    compute_advantages,
    spatial_advantages,
    weighted_total,
)
from refiner_rl.scoring.base import (
    KNOWN_FIELDS,
    Reward,
    ScoreResult,
    as_image_tensor,
    clean_score,
    freeze,
    outside_zero3_init,
    score_safely,
    to_pil,
)
from refiner_rl.scoring.batch import BatchScores, score_batch
from refiner_rl.scoring.functions import FunctionReward
from refiner_rl.scoring.registry import (
    RewardConfigError,
    available_rewards,
    build_reward,
    build_reward_funcs,
    check_required_fields,
    get_reward_class,
    register_reward,
    resolve_reward,
    reward_labels,
    split_weights,
)

__all__ = [
    "KNOWN_FIELDS",
    "AdvantageResult",
    "BatchScores",
    "FunctionReward",
    "Reward",
    "RewardConfigError",
    "ScoreResult",
    "as_image_tensor",
    "available_rewards",
    "build_reward",
    "build_reward_funcs",
    "check_required_fields",
    "clean_score",
    "compute_advantages",
    "freeze",
    "get_reward_class",
    "outside_zero3_init",
    "register_reward",
    "resolve_reward",
    "reward_labels",
    "score_batch",
    "score_safely",
    "spatial_advantages",
    "split_weights",
    "to_pil",
    "weighted_total",
]
