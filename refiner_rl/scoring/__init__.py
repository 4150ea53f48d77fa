"""Reward interface, registry and aggregation (the trainers call these; plug-ins live in ``rewards/``).

- :mod:`refiner_rl.scoring.base`: the :class:`Reward` base class and :func:`score_safely`;
- :mod:`refiner_rl.scoring.registry`: ``@register_reward``, entry points, ``build_rewards`` from a recipe;
- :mod:`refiner_rl.scoring.aggregate`: ``compute_advantages`` (sum or GDPO) and ``spatial_advantages``;
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
)
from refiner_rl.scoring.registry import (
    RewardConfigError,
    available_rewards,
    build_reward,
    build_rewards,
    check_required_fields,
    get_reward_class,
    register_reward,
    reward_labels,
)

__all__ = [
    "KNOWN_FIELDS",
    "AdvantageResult",
    "Reward",
    "RewardConfigError",
    "ScoreResult",
    "as_image_tensor",
    "available_rewards",
    "build_reward",
    "build_rewards",
    "check_required_fields",
    "clean_score",
    "compute_advantages",
    "freeze",
    "get_reward_class",
    "outside_zero3_init",
    "register_reward",
    "reward_labels",
    "score_safely",
    "spatial_advantages",
    "weighted_total",
]
