"""Sigma schedules: for sampling (the Kontext pipeline's) and for SFT (the SD3/Flux training recipes').

Convention (diffusers flow-match): ``x_s = (1 - s) x0 + s eps`` with s = sigma in [0, 1]; s = 1 is pure
noise, s = 0 is the clean image.

| function                 | used by | mirrors (diffusers)                                            |
|--------------------------|---------|----------------------------------------------------------------|
| ``calculate_shift``      | GRPO    | ``pipelines.flux.pipeline_flux_kontext.calculate_shift``       |
| ``flux_time_shift``      | GRPO    | ``FlowMatchEulerDiscreteScheduler._time_shift_exponential``    |
| ``sigma_schedule``       | GRPO    | ``scheduler.set_timesteps(sigmas=..., mu=...)``, ``.sigmas``   |
| ``sample_training_sigmas`` | SFT   | ``training_utils.compute_density_for_timestep_sampling``       |
| ``loss_weighting``       | SFT     | ``training_utils.compute_loss_weighting_for_sd3``              |
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch

SigmaScheme = Literal["logit_normal", "uniform", "mode"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
TRAINING_SIGMA_SCHEMES = get_args(SigmaScheme)
LOSS_WEIGHTING_SCHEMES = get_args(LossWeighting)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift ``mu`` of Flux: a line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), evaluated at the packed latent token count ``image_seq_len``.

    ``mu = image_seq_len * m + b`` with ``m = (max_shift - base_shift) / (max_seq_len - base_seq_len)`` and
    ``b = base_shift - m * base_seq_len``.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_time_shift(mu: float, sigma):
    """Flux's exponential time shift: ``s' = e^mu / (e^mu + (1 / s - 1))``.

    ``sigma`` may be a float, a numpy array or a tensor; ``mu > 0`` moves every sigma towards 1 (more noise),
    which larger images need. s = 1 stays 1 and s -> 0 stays 0.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def static_shift(shift: float, sigma):
    """SD3's static shift: ``s' = shift * s / (1 + (shift - 1) * s)``; shift = 1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(
    num_steps: int,
    image_seq_len: int | None = None,
    shift: float | None = None,
    use_dynamic_shifting: bool = True,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """Descending sampling sigmas ``[num_steps + 1]`` (fp32) ending in 0.0; step i: sigmas[i] -> sigmas[i+1].

    - ``use_dynamic_shifting=True`` (FLUX.1-Kontext-dev): ``flux_time_shift(calculate_shift(image_seq_len),
      t)`` applied to ``t = linspace(1, 1 / num_steps, num_steps)``, as the Kontext pipeline sets up
      ``FlowMatchEulerDiscreteScheduler``; ``image_seq_len`` is the packed token count (``latents.shape[1]``).
    - ``use_dynamic_shifting=False`` with ``shift``: the SD3 static shift of ``t``.
    - ``use_dynamic_shifting=False`` without ``shift``: plain linear ``t``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 sampling steps, got {num_steps}.")
    # numpy float32 on purpose: it repeats diffusers' own arithmetic, so this equals scheduler.sigmas exactly.
    t = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError(
                "sigma_schedule: image_seq_len is required when use_dynamic_shifting=True (pass the packed "
                "latent token count, latents.shape[1]), or set use_dynamic_shifting=False."
            )
        if shift is not None:
            raise ValueError(
                "sigma_schedule: shift is only used when use_dynamic_shifting=False; with dynamic shifting "
                "the shift comes from image_seq_len. Drop `shift` or set use_dynamic_shifting=False."
            )
        mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        sigmas = flux_time_shift(mu, t)
    else:
        sigmas = static_shift(1.0 if shift is None else shift, t)
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([sigmas, torch.zeros(1)])


def sample_training_sigmas(
    batch: int,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    shift: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sigmas in [0, 1] for SFT, one per sample (fp32 ``[batch]``). Same draws as diffusers'
    ``compute_density_for_timestep_sampling`` for the same generator state:

    - ``logit_normal``: ``u = sigmoid(N(logit_mean, logit_std))`` (SD3's default, mean 0, std 1);
    - ``mode``: ``u ~ U[0, 1)``, ``s = 1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u)`` (SD3, scale 1.29);
    - ``uniform``: ``s ~ U[0, 1)``.

    ``shift`` (optional) then applies the static shift ``shift s / (1 + (shift - 1) s)``. diffusers' training
    scripts round sigma to one of the scheduler's 1000 training timesteps; we keep it continuous.
    """
    if scheme not in TRAINING_SIGMA_SCHEMES:
        raise ValueError(f"Unknown timestep sampling scheme {scheme!r}; known: {', '.join(TRAINING_SIGMA_SCHEMES)}.")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        u = torch.sigmoid(u)
    elif scheme == "mode":
        u = torch.rand(size=(batch,), device=device, generator=generator)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch,), device=device, generator=generator)
    if shift is not None:
        u = static_shift(shift, u)
    return u.float()


def loss_weighting(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample weight of the flow-matching loss (diffusers' ``compute_loss_weighting_for_sd3``):

    - ``none``: 1;
    - ``sigma_sqrt``: ``s^-2`` (infinite at s = 0);
    - ``cosmap``: ``2 / (pi (1 - 2 s + 2 s^2))``.
    """
    if scheme not in LOSS_WEIGHTING_SCHEMES:
        raise ValueError(f"Unknown loss weighting scheme {scheme!r}; known: {', '.join(LOSS_WEIGHTING_SCHEMES)}.")
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)
