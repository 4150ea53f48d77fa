"""Pure loss functions of the trainers (formulas in the docstrings, checked by hand in the tests)."""

from __future__ import annotations

import torch

from refiner_rl.dynamics import kl_same_std


def mask_token_weights(mask_tokens: torch.Tensor, mask_weight: float) -> torch.Tensor:
    """Per-token weight ``w = 1 + lambda * M`` (OmniRefiner's weighted mask loss; lambda = ``mask_weight``)."""
    return 1.0 + mask_weight * mask_tokens.float()


def mask_weighted_flow_loss(
    v_pred: torch.Tensor,
    v_target: torch.Tensor,
    mask_tokens: torch.Tensor,
    mask_weight: float,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss with the edit mask up-weighted.

    For sample b with tokens n and channels c, ``e[b, n] = mean_c (v_pred - v_target)^2`` and
    ``w[b, n] = 1 + lambda * M[b, n]``; the sample's loss is the weighted mean ``sum_n w e / sum_n w``
    (so its scale does not depend on the mask's area), times the optional per-sample timestep weight
    (SD3 loss weighting). The batch loss is the mean over samples. ``v_target = eps - x0``.
    """
    err = (v_pred.float() - v_target.float()).pow(2).mean(dim=-1)  # [B, N]
    w = mask_token_weights(mask_tokens, mask_weight)
    per_sample = (w * err).sum(dim=1) / w.sum(dim=1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.float()
    return per_sample.mean()


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate, elementwise (per sample, or per token for spatial advantages).

    ``ratio = exp(log_prob - old_log_prob)``;
    ``loss = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))``.
    Returns the elementwise loss and TRL's clip indicators: ``low`` (ratio < 1 - eps_low with A < 0),
    ``high`` (ratio > 1 + eps_high with A > 0) and ``region`` (either), plus the ratio itself.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).float()
    return loss, {"ratio": ratio.detach(), "low": low, "high": high, "region": torch.maximum(low, high)}


def _errors(sq: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Squared errors ``[B, N, C]`` reduced like the advantages: the mean over every dim but the first (``[B]``)
    for one advantage per sample, the mean over the last dim (``[B, N]``, per token) for per-token advantages."""
    sq = sq.float()
    return sq.mean(dim=-1) if advantages.ndim == 2 else sq.flatten(1).mean(dim=1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    adv_clip_max: float,
    adaptive: bool = False,
) -> torch.Tensor:
    """DiffusionNFT's negative-aware fine-tuning loss per sample ``[B]`` (arXiv 2509.16117).

    On a clean rollout sample ``x0`` re-noised to ``x_t = (1 - t) x0 + t eps``, with the rollout policy's velocity
    ``v_old`` (no gradient) and the current one ``v_theta``, the implicit positive and negative policies are
    ``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``. With
    ``x0_hat(v) = x_t - t v`` and ``r = clamp(A / (2 A_max) + 1/2, 0, 1)`` (``A_max = adv_clip_max``):
    ``loss = r ||x0_hat(v+) - x0||^2 + (1 - r) ||x0_hat(v-) - x0||^2``, squared norms as means over the latent dims.
    With ``beta = 1`` and ``r = 1`` it is ``t^2 ||v_theta - (eps - x0)||^2``: plain flow matching weighted by t^2.
    At ``v_theta = v_old`` the gradient is ``-2 beta t^2 (2 r - 1) (eps - x0 - v_old)`` per dim (over its count): flow
    matching towards the sample, weighted by ``A / A_max``. ``t`` is ``[B]`` (broadcast over the latent dims).
    Per-token advantages ``[B, N]`` (latents ``[B, N, C]``) give a per-token ``r`` and a loss ``[B, N]``.
    ``adaptive``: each squared error is divided by its sample's ``sg(mean |x0_hat(v) - x0|)`` (no gradient, at least
    1e-5), as DiffusionNFT's code does: every sample's loss then has the scale of its error, and the ``t^2`` weight of
    the x0 error becomes ``t`` over the sample's velocity error."""
    if adv_clip_max <= 0:
        raise ValueError(f"nft_loss: adv_clip_max must be > 0, got {adv_clip_max}")
    v_old = v_old.detach().float()
    v_theta, x_t, x0 = v_theta.float(), x_t.float(), x0.float()
    t = t.float().reshape(-1, *([1] * (x_t.ndim - 1)))
    r = torch.clamp(advantages.float() / (2 * adv_clip_max) + 0.5, 0.0, 1.0)
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    d_pos, d_neg = x_t - t * v_pos - x0, x_t - t * v_neg - x0
    err_pos, err_neg = _errors(d_pos**2, r), _errors(d_neg**2, r)
    if adaptive:
        err_pos = err_pos / _scale(d_pos, r)
        err_neg = err_neg / _scale(d_neg, r)
    return r * err_pos + (1 - r) * err_neg


def _scale(d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sg(mean |d|)`` per sample (over every latent dim), at least 1e-5, shaped to divide a loss like ``like``."""
    m = d.detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
    return m[:, None] if like.ndim == 2 else m


def awm_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_target: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching's clipped surrogate per sample (arXiv 2509.25050).

    On re-noised rollout samples, the flow-matching errors ``e_theta = ||v_theta - (eps - x0)||^2`` and ``e_old``
    (rollout policy, no gradient), means over the latent dims, act as negative log-likelihoods:
    ``ratio = exp(-scale (e_theta - e_old))``, then :func:`clipped_surrogate`. ``scale`` is the likelihood's
    inverse temperature (the paper's scaling of the error; 1 = the plain error). Equal policies give ratio 1
    exactly, and there the gradient is ``scale A grad e_theta``: advantage-weighted flow matching.
    ``v_target = eps - x0``. Per-token advantages ``[B, N]`` give per-token errors, ratios and losses."""
    e_theta = _errors((v_theta.float() - v_target.float()) ** 2, advantages)
    e_old = _errors((v_old.detach().float() - v_target.float()) ** 2, advantages)
    return clipped_surrogate(-scale * e_theta, -scale * e_old, advantages, epsilon_low, epsilon_high)


def guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std,
) -> torch.Tensor:
    """GRPO-Guard's per-timestep ratio normalisation (RatioNorm, arXiv 2510.22319): the log-ratio of one SDE step,
    recentred and rescaled so that its distribution is the same at every noise level.

    ``log r = log p_theta(x') - log p_old(x')`` (Gaussian log-probs with the step's std ``s``, means over the latent
    dims) has expectation ``-b`` under the rollout, ``b = mean (mu_theta - mu_old)^2 / (2 s^2)`` (the same-std KL),
    and a spread that grows as ``1 / s``: clipping then acts at some steps and not at others. The normalised
    log-ratio is ``(log r + b) s = mean_d(z (mu_theta - mu_old))``, with ``z = (x' - mu_old) / s`` the rollout's
    standard noise: zero-mean, and its scale does not depend on ``s``. Feed ``exp`` of it to the clipped
    surrogate (the paper also weights each step's loss by ``1 / |dt|``). ``mean``/``old_mean``: ``[B, N, C]``;
    ``std``: a float or per-sample tensor; log-probs ``[B]`` return ``[B]``, per-token ones ``[B, N]`` return
    ``[B, N]``."""
    b, b_tokens = kl_same_std(mean, old_mean, std)
    per_token = log_prob.ndim == 2
    s = torch.as_tensor(std, dtype=torch.float32, device=mean.device).reshape(-1)
    s = s.reshape(-1, *([1] * (log_prob.ndim - 1))) if s.numel() > 1 else s[0]
    return (log_prob.float() - old_log_prob.float() + (b_tokens if per_token else b)) * s
