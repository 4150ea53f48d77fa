"""Pure loss functions of the trainers (formulas in the docstrings, checked by hand in the tests)."""

from __future__ import annotations

import torch


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
