"""One sampling step of a flow-matching policy: ODE Euler, or a Gaussian SDE step with a log-prob.

Conventions (diffusers flow-match; docs/algorithms.md#conventions): ``x_s = (1 - s) x0 + s eps``; the model predicts
``v = eps - x0``; a step goes s -> s' < s with ``dt = s' - s < 0``. Estimates: ``x0_hat = x - s v``,
``eps_hat = x + (1 - s) v``. Latents are ``[B, ...]`` (packed ``[B, N, C]`` for Flux); ``sigma`` and
``sigma_next`` are floats or per-sample tensors ``[B]``. All step math runs in fp32 (inputs are upcast).

| rule       | std (a = noise_level)                     | mean                                           |
|------------|-------------------------------------------|------------------------------------------------|
| ode        | 0                                         | x + v dt (the scheduler's Euler step)          |
| flow_sde   | g sqrt|dt|, g = a sqrt(s / (1 - s))       | x + (v + g^2 / (2 s) eps_hat) dt               |
| dance      | a sqrt|dt| (constant g = a)              | x + (v + a^2 / (2 s) eps_hat) dt               |
| cps        | s' sin(a pi / 2)                          | (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat   |

Why flow_sde and dance share one mean. The score of ``p_s`` is
``grad log p_s(x) = -E[eps | x] / s = -eps_hat / s``. For any diffusion coefficient g(s), the forward SDE
``dx = (v + g^2 / 2 grad log p) ds + g dW`` has the marginals of the ODE ``dx = v ds``; its time reversal,
run with ds < 0, is ``dx = (v - g^2 / 2 grad log p) ds + g dW``, i.e. drift ``v + g^2 / (2 s) eps_hat``.
Euler-Maruyama over ``dt`` gives ``mu = x + (v + g^2 / (2 s) eps_hat) dt`` and variance ``g^2 |dt|``.
Flow-GRPO picks ``g = a sqrt(s / (1 - s))``; DanceGRPO a constant ``g = eta`` (its code,
``mu = x + v dt - 0.5 eta^2 score dt`` with ``score = -(x - (1 - s) x0_hat) / s^2 = -eps_hat / s``, is the
same formula). With a = 0 both are ODE Euler. tests/test_dynamics.py checks that both keep the marginals
of Gaussian data (one-step error O(dt^2), and full sampling from noise).

Log-prob and KL, the project's one convention: the Gaussian log-density per element, then the MEAN over
the last dim (``log_prob_tokens`` ``[B, N]``) and over the remaining non-batch dims (``log_prob`` ``[B]``),
so the scalar is the mean over all latent dims, as in Flow-GRPO and DanceGRPO. Ratios then move very
little, which is why GRPO clip ranges here are ~1e-4. ``kl_same_std`` is reduced the same way.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch

StepRule = Literal["ode", "flow_sde", "dance", "cps"]
STEP_RULES = get_args(StepRule)
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


class StepOutput(NamedTuple):
    """One SDE step. ``std`` broadcasts against the sample; the log-probs are ``None`` for ``rule="ode"``."""

    next_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None
    log_prob_tokens: torch.Tensor | None


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-dim or ``[B]`` tensor as an fp32 tensor that broadcasts against ``like`` ``[B, ...]``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 1 and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x' = x + v (s' - s)``, in fp32.

    Equals ``FlowMatchEulerDiscreteScheduler.step`` (dt is taken in fp32, like the scheduler's fp32 sigmas).
    """
    x = x.float()
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return x + v.float() * dt


def _check_args(rule: str, noise_level: float, sigma, sigma_next) -> None:
    if rule not in STEP_RULES:
        raise ValueError(f"Unknown step rule {rule!r}; known: {', '.join(STEP_RULES)}.")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
    if rule == "cps" and noise_level > 1:
        raise ValueError(f"rule='cps' needs noise_level in [0, 1] (std = s' sin(a pi / 2) <= s'), got {noise_level}.")
    if isinstance(sigma, (int, float)) and isinstance(sigma_next, (int, float)) and not sigma > sigma_next:
        raise ValueError(f"A step goes from high to low noise: need sigma > sigma_next, got {sigma} -> {sigma_next}.")


def step_mean_std(
    rule: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_max=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian ``p(x' | x)`` of one step (see the module table), both fp32.

    ``noise_level`` is the table's a (Flow-GRPO uses 0.7 for SD3 and 0.9 for Flux; DanceGRPO's eta is
    ~0.3). ``sigma_max`` only matters for ``flow_sde`` at s = 1, where ``s / (1 - s)`` is infinite: there
    Flow-GRPO puts the schedule's first sigma below 1 (``sigmas[1]``) in the denominator,
    ``g = a sqrt(s / (1 - where(s == 1, sigma_max, s)))``. When ``sigma_max`` is None, ``sigma_next`` is
    used, which is the same value for step 0. ``std`` broadcasts against ``x`` (0-dim for float sigmas,
    ``[B, 1, ...]`` for per-sample sigmas).
    """
    _check_args(rule, noise_level, sigma, sigma_next)
    x, v = x.float(), v.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    if rule == "ode":
        return x + v * dt, torch.zeros_like(dt)
    if rule == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat, eps_hat = x - s * v, x + (1 - s) * v
        return (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - std**2) * eps_hat, std
    if rule == "flow_sde":
        s_cap = s_next if sigma_max is None else _per_sample(sigma_max, x)
        g2 = noise_level**2 * s / (1 - torch.where(s == 1, s_cap, s))
    else:  # dance: constant diffusion coefficient g = a
        g2 = torch.full_like(s, noise_level**2)
    eps_hat = x + (1 - s) * v
    mean = x + (v + g2 / (2 * s) * eps_hat) * dt
    return mean, torch.sqrt(g2 * -dt)


def _reduce(per_element: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last dim (tokens ``[B, N]``), then over the other non-batch dims (scalar ``[B]``)."""
    tokens = per_element.mean(dim=-1)
    scalar = tokens.mean(dim=tuple(range(1, tokens.ndim))) if tokens.ndim > 1 else tokens
    return scalar, tokens


def _broadcast_std(std, like: torch.Tensor) -> torch.Tensor:
    std = _per_sample(std, like)
    if bool((std <= 0).any()):
        raise ValueError(
            "std must be > 0 for a log-prob or a KL: ODE steps have none (rule='ode', noise_level=0, or "
            "the last step to sigma 0 under rule='cps'). Keep such steps out of the SDE window."
        )
    return std


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-density of ``x_next`` under ``N(mean, std^2)`` in fp32: ``(log_prob [B], log_prob_tokens [B, N])``.

    Per element ``-(x' - mu)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))``; then the MEAN over the last dim
    gives ``log_prob_tokens`` and the mean over the remaining non-batch dims gives ``log_prob`` (= the mean
    over all latent dims). ``std`` is a float or a tensor broadcastable per sample; it must be > 0.
    ``x_next`` is the stored sample: store it in fp32, or the recomputed log-prob differs from the rollout's.
    """
    x_next, mean = x_next.float(), mean.float()
    if mean.ndim < 2:
        raise ValueError(f"log_prob expects samples [B, ...] with at least 2 dims, got shape {tuple(mean.shape)}.")
    std = _broadcast_std(std, mean)
    per_element = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _reduce(per_element)


def kl_same_std(mean_a: torch.Tensor, mean_b: torch.Tensor, std) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(N(mean_a, std^2) || N(mean_b, std^2))`` per element ``(mu_a - mu_b)^2 / (2 std^2)``, reduced like
    ``log_prob``: ``(kl [B], kl_tokens [B, N])``, fp32.

    This is the exact Gaussian KL with the step's own std ``sigma = g sqrt|dt|``. Flow-GRPO divides by
    ``2 g^2`` instead (|dt| absorbed into beta): our KL is theirs / |dt|, so the same penalty needs
    beta = theirs * |dt|.
    """
    mean_a, mean_b = mean_a.float(), mean_b.float()
    if mean_a.ndim < 2:
        raise ValueError(f"kl_same_std expects samples [B, ...] with at least 2 dims, got shape {tuple(mean_a.shape)}.")
    std = _broadcast_std(std, mean_a)
    return _reduce((mean_a - mean_b) ** 2 / (2 * std**2))


def sde_step(
    rule: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    sigma_max=None,
) -> StepOutput:
    """Sample ``x' = mean + std * z`` for one step and return it with its log-prob under ``(mean, std)``.

    ``z`` is ``noise`` when given (same shape as ``x``), else ``torch.randn`` from ``generator`` (drawn on the
    generator's device, so a seeded CPU generator gives the same noise on any device). The log-prob is
    ``log_prob(next_sample, mean, std)``, so recomputing it from the same inputs reproduces it exactly.
    With ``rule="ode"`` no noise is drawn and the log-probs are ``None``.
    """
    mean, std = step_mean_std(rule, x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max)
    if rule == "ode":
        return StepOutput(mean, mean, std, None, None)
    if noise is None:
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but the sample has shape {tuple(mean.shape)}.")
    next_sample = mean + std * noise.to(device=mean.device, dtype=torch.float32)
    # Detached like Flow-GRPO's: x' is data for the log-prob, whose gradient must reach the mean only.
    lp, lp_tokens = log_prob(next_sample.detach(), mean, std)
    return StepOutput(next_sample, mean, std, lp, lp_tokens)
