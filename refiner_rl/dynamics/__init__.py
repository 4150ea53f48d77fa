"""Sampling dynamics of flow-matching policies: pure tensor functions, no models.

- ``schedules``: sampling sigmas (equal to the Kontext pipeline's scheduler), SFT sigma sampling and loss
  weights.
- ``steps``: one step, ODE Euler or an SDE (``flow_sde``, ``dance``, ``cps``) with its Gaussian log-prob and
  the same-std KL; log-probs are means over latent dims (``[B]``) and over channels (``[B, N]`` per token).
- ``window``: which steps are stochastic and trained (fixed, sliding, random); the last step never is.
"""

from refiner_rl.dynamics.schedules import (
    LOSS_WEIGHTING_SCHEMES,
    TRAINING_SIGMA_SCHEMES,
    calculate_shift,
    flux_time_shift,
    loss_weighting,
    sample_training_sigmas,
    sigma_schedule,
    static_shift,
)
from refiner_rl.dynamics.steps import (
    STEP_RULES,
    StepOutput,
    kl_same_std,
    log_prob,
    ode_step,
    sde_step,
    step_mean_std,
)
from refiner_rl.dynamics.window import WINDOW_MODES, WindowSchedule, sde_window

__all__ = [
    "LOSS_WEIGHTING_SCHEMES",
    "STEP_RULES",
    "TRAINING_SIGMA_SCHEMES",
    "WINDOW_MODES",
    "StepOutput",
    "WindowSchedule",
    "calculate_shift",
    "flux_time_shift",
    "kl_same_std",
    "log_prob",
    "loss_weighting",
    "ode_step",
    "sample_training_sigmas",
    "sde_step",
    "sde_window",
    "sigma_schedule",
    "static_shift",
    "step_mean_std",
]
