"""Sampling trajectories from the policy: the rollout of GRPO and the sampler of evaluation.

Every step calls the editor's :meth:`~refiner_rl.policies.base.EditorPolicy.velocity`. Steps listed in ``sde_steps`` are stochastic: their
start state, sampled next state and log-prob are stored so the trainer can recompute the log-prob with
gradient. The other steps are ODE Euler steps. Rollout runs entirely under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refiner_rl.dynamics import ode_step, sde_step
from refiner_rl.errors import NumericsError
from refiner_rl.policies.attention import attention_backend
from refiner_rl.policies.base import EditorPolicy
from refiner_rl.policies.flux import Conditions


@dataclass
class Trajectory:
    latents: torch.Tensor  # [B, N, C] final (clean) latents, fp32
    states: torch.Tensor  # [B, K, N, C] state at the start of each stochastic step
    next_states: torch.Tensor  # [B, K, N, C] sampled next state
    log_probs: torch.Tensor  # [B, K] log-prob of next_states at rollout
    log_prob_tokens: torch.Tensor  # [B, K, N] per-token log-probs (for spatial advantages)
    sde_steps: list[int]  # the K step indices
    sigmas: torch.Tensor  # [num_steps + 1]
    means: torch.Tensor | None = None  # [B, K, N, C] mean of each stochastic step (GRPO-Guard's old mean)


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators, device) -> torch.Tensor:
    """Standard normal fp32 noise of ``shape`` on ``device``, drawn on the generator's device.

    ``generator`` is one generator for the whole batch, or one per sample (row): then each sample's noise depends
    only on its own generator, whatever batch or process it lands in (how data-parallel runs stay equal to one
    process)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} samples")
        rows = [
            torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(device)
            for g in generator
        ]
        return torch.stack(rows)
    dev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=dev, dtype=torch.float32).to(device)


def initial_latents(
    policy: EditorPolicy,
    cond: Conditions,
    generator: Generators,
    start_sigma: float = 1.0,
    draft_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure noise (``start_sigma = 1``), or the draft noised to ``start_sigma`` (SDEdit-style start)."""
    b, n, c = cond.batch_size, cond.num_target_tokens, policy.latent_channels
    noise = randn((b, n, c), generator, policy.device)
    if start_sigma >= 1.0 or draft_latents is None:
        return noise
    return (1.0 - start_sigma) * draft_latents.float() + start_sigma * noise


def coarse_tail(sigmas: torch.Tensor, end: int, tail_steps: int | None) -> torch.Tensor:
    """``sigmas`` with the part after index ``end`` thinned to ``tail_steps`` steps: ``sigmas[:end + 1]``, then an
    even subset of ``sigmas[end + 1:]`` that always keeps the last value (sigma 0). Steps before ``end`` keep their
    indices and values, so an SDE window ending at ``end`` is untouched. ``None`` (or a tail that is already
    short enough) returns ``sigmas``."""
    remaining = len(sigmas) - 1 - end
    if tail_steps is None or remaining <= tail_steps:
        return sigmas
    picks = torch.linspace(0, remaining, tail_steps + 1).round().long()[1:] + end
    return torch.cat([sigmas[: end + 1], sigmas[picks]])


@torch.no_grad()
def rollout(
    policy: EditorPolicy,
    cond: Conditions,
    sigmas: torch.Tensor,
    *,
    x: torch.Tensor,
    sde_steps: Sequence[int] = (),
    rule: str = "flow_sde",
    noise_level: float = 0.9,
    generator: Generators = None,
    true_cfg_scale: float = 1.0,
    transformer=None,
    sigma_max=None,
) -> Trajectory:
    """Integrate from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` with SDE steps at ``sde_steps``.

    ``generator``: one for the batch, or one per sample (see :func:`randn`). ``sigma_max`` is the ``flow_sde``
    cap at s = 1 (default ``sigmas[1]``); pass the full schedule's when ``sigmas`` is a tail of it."""
    sde = set(sde_steps)
    if sde and max(sde) >= len(sigmas) - 1:
        raise ValueError(f"sde_steps {sorted(sde)} out of range for {len(sigmas) - 1} steps")
    if sigma_max is None:
        sigma_max = sigmas[1] if len(sigmas) > 1 else None
    states, nexts, lps, lpts, means = [], [], [], [], []
    x = x.float()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        v = policy.velocity(
            x,
            torch.full((x.shape[0],), s, device=x.device),
            cond,
            transformer=transformer,
            true_cfg_scale=true_cfg_scale,
        )
        if not bool(torch.isfinite(v).all()):
            raise non_finite_error(v, i, s, s_next, transformer if transformer is not None else policy.transformer)
        if i in sde:
            per_sample = isinstance(generator, (list, tuple))
            noise = randn(x.shape, generator, x.device) if per_sample else None
            out = sde_step(
                rule,
                x,
                v,
                s,
                s_next,
                noise_level,
                generator=None if per_sample else generator,
                noise=noise,
                sigma_max=sigma_max,
            )
            states.append(x)
            nexts.append(out.next_sample)
            lps.append(out.log_prob)
            lpts.append(out.log_prob_tokens)
            means.append(out.mean)
            x = out.next_sample
        else:
            x = ode_step(x, v, s, s_next)
    b = x.shape[0]
    empty = x.new_zeros((b, 0) + tuple(x.shape[1:]))
    return Trajectory(
        latents=x,
        states=torch.stack(states, 1) if states else empty,
        next_states=torch.stack(nexts, 1) if nexts else empty,
        log_probs=torch.stack(lps, 1) if lps else x.new_zeros(b, 0),
        log_prob_tokens=torch.stack(lpts, 1) if lpts else x.new_zeros(b, 0, x.shape[1]),
        sde_steps=sorted(sde),
        sigmas=sigmas,
        means=torch.stack(means, 1) if means else empty,
    )


def non_finite_error(v: torch.Tensor, step: int, sigma: float, sigma_next: float, transformer) -> NumericsError:
    """The error for a velocity with NaN or inf entries at a rollout step: where, how much, and which kernel."""
    bad = (~torch.isfinite(v)).float().mean().item()
    return NumericsError(
        f"rollout step {step} (sigma {sigma:.4f} -> {sigma_next:.4f}): the velocity is non-finite in {bad:.1%} of its "
        f"entries ({v.dtype}, attention backend {attention_backend(transformer)}); try fp32 weights, another attention "
        "kernel, or a lower learning rate"
    )


def paste_back(images: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the draft outside the mask: ``M * images + (1 - M) * draft``."""
    m = mask.to(images.device, images.dtype)
    return m * images + (1 - m) * draft.to(images.device, images.dtype)
