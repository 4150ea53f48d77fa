"""``masked_pixel``: pixel error against the ground truth inside (or outside) the edit mask.

    reward = - sum(M * err) / sum(M),   err = mean over channels of (x - x_gt)^2   (``error: l2``)
                                                                or |x - x_gt|     (``error: l1``)

in ``[0, 1]`` pixel space, so the reward lies in ``[-1, 0]`` and 0 is a perfect match. ``M`` is the mask
(``region: inside``, OmniRefiner's "masked MSE for detail learning") or ``1 - M`` (``region: outside``: the
"keep everything else unchanged" regulariser against reward hacking). Soft masks weight pixels by their value. Without a
mask column the region is the whole image (``inside``) or empty (``outside``). An empty region scores
``None``. With ``patch_size`` the reward also gives a map: each grid cell's own masked error, NaN where the
cell holds no region pixel.

Differentiable (:meth:`MaskedPixel.score_tensors`): the same formula on a batch ``[B, 3, H, W]`` with gradient into
the images (in float32; the list path sums in float64), NaN where the region is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from refiner_rl.scoring.base import (
    Reward,
    as_image_tensor,
    check_same_size,
    column_batch,
    column_value,
    required_value,
)
from refiner_rl.scoring.patches import cell_sums
from refiner_rl.scoring.registry import register_reward


@register_reward
class MaskedPixel(Reward):
    """Negative masked L2/L1 pixel error vs the target, inside or outside the mask (optional per-patch map)."""

    name = "masked_pixel"
    required_fields = ("target",)
    optional_fields = ("mask",)
    provides_maps = True
    differentiable = True

    def __init__(
        self,
        error: Literal["l2", "l1"] = "l2",
        region: Literal["inside", "outside"] = "inside",
        patch_size: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(device=device, dtype=dtype)
        if error not in ("l2", "l1"):
            raise ValueError(f"masked_pixel: error must be 'l2' or 'l1', got {error!r}")
        if region not in ("inside", "outside"):
            raise ValueError(f"masked_pixel: region must be 'inside' or 'outside', got {region!r}")
        if patch_size is not None and int(patch_size) < 1:
            raise ValueError(f"masked_pixel: patch_size must be a positive number of pixels, got {patch_size!r}")
        self.error = error
        self.region = region
        self.patch_size = int(patch_size) if patch_size is not None else None
        self.provides_maps = self.patch_size is not None

    def _one(self, completion: Any, target: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pixel error [H, W], region weights [H, W]) for one sample, in float64 for exact sums."""
        x = as_image_tensor(completion).to(torch.float64)
        gt = as_image_tensor(target).to(torch.float64)
        check_same_size(x, gt, "completion", "target", self.name)
        diff = x - gt
        err = (diff.square() if self.error == "l2" else diff.abs()).mean(dim=0)
        if mask is None:
            m = torch.ones_like(err)
        else:
            m = as_image_tensor(mask, channels=1).to(torch.float64)
            check_same_size(x, m, "completion", "mask", self.name)
            m = m[0].clamp(0.0, 1.0)
        if self.region == "outside":
            m = 1.0 - m
        return err, m

    def _score(self, completions: Sequence[Any], columns: dict, with_maps: bool):
        scores: list[float | None] = []
        maps: list[torch.Tensor | None] = []
        for i, completion in enumerate(completions):
            err, m = self._one(
                completion, required_value(columns, "target", i, self.name), column_value(columns, "mask", i)
            )
            area = m.sum()
            scores.append(None if area <= 0 else float(-(m * err).sum() / area))
            if not with_maps or self.patch_size is None:
                maps.append(None)
                continue
            cell_area = cell_sums(m, self.patch_size)
            cell_err = cell_sums(m * err, self.patch_size)
            maps.append(torch.where(cell_area > 0, -cell_err / cell_area.clamp(min=1e-300), float("nan")).float())
        return scores, maps

    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        return self._score(completions, columns, with_maps=False)[0]

    def score_maps(self, prompts: Sequence[str], completions: Sequence[Any], **columns):
        return self._score(completions, columns, with_maps=True)

    def score_tensors(self, images: torch.Tensor, columns: dict) -> torch.Tensor:
        """``-sum(M * err) / sum(M)`` per image of ``images`` ``[B, 3, H, W]``, differentiable; NaN where the region
        is empty."""
        x = images.float()
        gt = column_batch(columns, "target", x, self.name)
        check_same_size(x, gt, "completion", "target", self.name)
        diff = x - gt
        err = (diff.square() if self.error == "l2" else diff.abs()).mean(dim=1)
        mask = column_batch(columns, "mask", x, self.name, channels=1, required=False)
        if mask is None:
            m = torch.ones_like(err)
        else:
            check_same_size(x, mask, "completion", "mask", self.name)
            m = mask[:, 0].clamp(0.0, 1.0)
        if self.region == "outside":
            m = 1.0 - m
        area = m.flatten(1).sum(1)
        score = -(m * err).flatten(1).sum(1) / area.clamp(min=1e-12)
        return torch.where(area > 0, score, torch.full_like(score, float("nan")))
