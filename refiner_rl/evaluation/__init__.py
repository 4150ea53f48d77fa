"""Evaluation: one loop for the trainers' held-out metrics, the demo's table and ``refiner-rl eval``.

- :func:`evaluate`: held-out masked MSE (and reward means) of one policy (:mod:`refiner_rl.evaluation.held_out`);
- :func:`evaluate_candidates`: named candidates x metric plug-ins, mean ± 95% CI table, per-record JSON, grid, W&B
  (:mod:`refiner_rl.evaluation.run`);
- :mod:`refiner_rl.evaluation.loop`: the sampling and scoring loop both use; :mod:`~refiner_rl.evaluation.candidates`:
  candidates and checkpoint loading; :mod:`~refiner_rl.evaluation.report`: statistics and outputs.
"""

from refiner_rl.evaluation.candidates import Candidate, load_candidate, parse_candidates
from refiner_rl.evaluation.held_out import before_after_table, evaluate, reward_columns
from refiner_rl.evaluation.loop import SamplerSettings, run_policy
from refiner_rl.evaluation.run import EvalResult, evaluate_candidates
from refiner_rl.metrics.masked import masked_mse

__all__ = [
    "Candidate",
    "EvalResult",
    "SamplerSettings",
    "before_after_table",
    "evaluate",
    "evaluate_candidates",
    "load_candidate",
    "masked_mse",
    "parse_candidates",
    "reward_columns",
    "run_policy",
]
