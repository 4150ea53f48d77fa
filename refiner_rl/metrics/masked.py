"""Pure masked pixel metrics on batches of images in ``[0, 1]``: no models, no state.

For images ``a, b`` of shape ``[B, C, H, W]`` and region weights ``W`` of shape ``[B, 1, H, W]`` (a mask, ``1 - mask``
for the outside, or soft weights), each function returns one value per image, a tensor ``[B]``:

    masked_mse(a, b, W)   = sum_p W_p * mean_c (a - b)^2 / sum_p W_p
    masked_mae(a, b, W)   = sum_p W_p * mean_c |a - b|   / sum_p W_p
    psnr_from_mse(e)      = 10 * log10(peak^2 / e)       (+inf where e = 0)
    masked_psnr(a, b, W)  = psnr_from_mse(masked_mse(a, b, W))
    change_outside(out, draft, M) = masked_mae(out, draft, 1 - M)

``W = None`` means the whole image. An image whose region is empty (``sum W = 0``) gives NaN: it is not scored,
never counted as 0.
"""

from __future__ import annotations

import torch


def _weights(a: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return torch.ones_like(a[:, :1], dtype=torch.float32)
    w = weight.float()
    if w.dim() == 3:
        w = w.unsqueeze(1)
    if w.shape[1] != 1:
        w = w.mean(1, keepdim=True)
    return w


def _masked_mean(err: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    total = w.flatten(1).sum(1)
    out = (err * w).flatten(1).sum(1) / total
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image ``sum(W * mean_c (a - b)^2) / sum(W)``; NaN where ``W`` is empty."""
    w = _weights(a, weight)
    return _masked_mean((a.float() - b.float()).pow(2).mean(1, keepdim=True), w)


def masked_mae(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image ``sum(W * mean_c |a - b|) / sum(W)``; NaN where ``W`` is empty."""
    w = _weights(a, weight)
    return _masked_mean((a.float() - b.float()).abs().mean(1, keepdim=True), w)


def psnr_from_mse(mse: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """``10 * log10(peak^2 / mse)`` in dB; ``+inf`` where ``mse == 0``, NaN stays NaN."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(peak**2 / mse)


def masked_psnr(
    a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None, peak: float = 1.0
) -> torch.Tensor:
    """Per-image PSNR (dB) of the masked MSE: ``10 * log10(peak^2 / masked_mse(a, b, W))``."""
    return psnr_from_mse(masked_mse(a, b, weight), peak)


def change_outside(output: torch.Tensor, draft: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """How much the output changed outside the mask: mean ``|output - draft|`` over ``1 - M`` (0 = untouched)."""
    w = None if mask is None else 1.0 - _weights(output, mask)
    return masked_mae(output, draft, w)
