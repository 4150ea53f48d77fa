"""Patch geometry shared by patch-wise rewards: grids, mask boxes, crops and reward maps.

Conventions:

- A box is ``(y0, y1, x0, x1)`` in pixels, half-open (``image[..., y0:y1, x0:x1]``).
- The *grid* of an ``H x W`` image for patch size ``p`` has ``ceil(H / p) x ceil(W / p)`` cells; cell
  ``(i, j)`` owns pixels ``[i p, min((i + 1) p, H)) x [j p, min((j + 1) p, W))``. Reward maps are laid on
  this grid, so a map ``[h, w]`` always covers the whole image.
- A patch has a *content* box (what the scorer sees: always ``p x p`` when the image is large enough, the
  last row/column shifted back inside the image) and an *owner* box (the pixels it gives credit to; owners
  of one tiling never overlap). Maps are the owner-area-weighted mean of patch values per cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Patch:
    content: Box
    owner: Box


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of grid cells ``(rows, cols)`` covering an ``height x width`` image."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def _tile_1d(start: int, stop: int, size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Tile ``[start, stop)`` with windows of ``size``: (content, owner) intervals. The last content window is
    shifted back to stay inside; a range shorter than ``size`` is one window of its own length."""
    out = []
    for a in range(start, stop, size):
        owner = (a, min(a + size, stop))
        c0 = max(start, min(a, stop - size))
        out.append(((c0, min(c0 + size, stop)), owner))
    return out


def tile_box(box: Box, patch_size: int) -> list[Patch]:
    """Patches tiling ``box`` row-major, anchored at its top-left corner."""
    y0, y1, x0, x1 = box
    rows, cols = _tile_1d(y0, y1, patch_size), _tile_1d(x0, x1, patch_size)
    return [Patch((cy[0], cy[1], cx[0], cx[1]), (oy[0], oy[1], ox[0], ox[1])) for cy, oy in rows for cx, ox in cols]


def grid_patches(height: int, width: int, patch_size: int) -> list[Patch]:
    """One patch per grid cell (row-major); owners are exactly the grid cells."""
    return tile_box((0, height, 0, width), patch_size)


def mask_bbox(mask: torch.Tensor, dilation: int = 0) -> Box | None:
    """Bounding box of ``mask > 0`` grown by ``dilation`` pixels on every side (clipped to the image);
    ``None`` for an empty mask. ``mask`` is ``[H, W]`` or ``[1, H, W]``."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]) > 0
    rows = torch.nonzero(m.any(dim=1)).flatten()
    cols = torch.nonzero(m.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    h, w = m.shape
    d = max(0, int(dilation))
    return (
        max(0, int(rows[0]) - d),
        min(h, int(rows[-1]) + 1 + d),
        max(0, int(cols[0]) - d),
        min(w, int(cols[-1]) + 1 + d),
    )


def grow_box(box: Box, min_size: int, height: int, width: int) -> Box:
    """Grow ``box`` around its centre to at least ``min_size`` per side (as far as the image allows), so a
    small region is still judged at the patch scale rather than blown up from a few pixels."""

    def grow(a: int, b: int, limit: int) -> tuple[int, int]:
        size = min(max(b - a, min_size), limit)
        a = max(0, min(a - (size - (b - a)) // 2, limit - size))
        return a, a + size

    y0, y1 = grow(box[0], box[1], height)
    x0, x1 = grow(box[2], box[3], width)
    return y0, y1, x0, x1


def box_sums(mask: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """Sum of ``mask`` ``[H, W]`` inside each box (one summed-area table, no per-box pass)."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1]).double()
    sat = F.pad(m.cumsum(0).cumsum(1), (1, 0, 1, 0))
    b = torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)
    y0, y1, x0, x1 = b.unbind(1)
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]).float()


def crop_resize(image: torch.Tensor, boxes: list[Box], size: int) -> torch.Tensor:
    """Crops of ``image`` ``[C, H, W]`` resized to ``size x size`` (bicubic, antialiased, clamped to [0, 1]):
    ``[P, C, size, size]``. Crops of equal shape are resized in one call."""
    out = torch.empty(len(boxes), image.shape[0], size, size, dtype=image.dtype, device=image.device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        by_shape.setdefault((y1 - y0, x1 - x0), []).append(k)
    for (h, w), idx in by_shape.items():
        crops = torch.stack([image[:, boxes[k][0] : boxes[k][1], boxes[k][2] : boxes[k][3]] for k in idx])
        if (h, w) != (size, size):
            crops = F.interpolate(crops, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out[idx] = crops.clamp(0.0, 1.0)
    return out


def splat_to_grid(owners: list[Box], values: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Reward map ``[h, w]`` on the image grid: per cell, the mean of patch ``values`` weighted by how many of
    the cell's pixels each patch owns; NaN where no patch owns a pixel of the cell."""
    gh, gw = grid_shape(height, width, patch_size)
    values = values.detach().float().cpu().reshape(-1)
    if len(owners) == 0:
        return torch.full((gh, gw), float("nan"))
    b = torch.tensor(owners, dtype=torch.float32).reshape(-1, 4)
    r0 = torch.arange(gh, dtype=torch.float32) * patch_size
    c0 = torch.arange(gw, dtype=torch.float32) * patch_size
    r1, c1 = (r0 + patch_size).clamp(max=height), (c0 + patch_size).clamp(max=width)
    ov_y = (torch.minimum(b[:, 1:2], r1) - torch.maximum(b[:, 0:1], r0)).clamp(min=0)  # [P, gh]
    ov_x = (torch.minimum(b[:, 3:4], c1) - torch.maximum(b[:, 2:3], c0)).clamp(min=0)  # [P, gw]
    area = ov_y[:, :, None] * ov_x[:, None, :]  # [P, gh, gw]
    total = area.sum(0)
    weighted = (area * values[:, None, None]).sum(0)
    return torch.where(total > 0, weighted / total.clamp(min=1e-12), torch.full_like(total, float("nan")))


def cell_sums(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum of ``x`` ``[..., H, W]`` over each grid cell: ``[..., h, w]`` (partial edge cells included)."""
    h, w = x.shape[-2:]
    gh, gw = grid_shape(h, w, patch_size)
    lead = x.shape[:-2]
    x = F.pad(x.reshape(-1, 1, h, w), (0, gw * patch_size - w, 0, gh * patch_size - h))
    sums = F.avg_pool2d(x, patch_size, stride=patch_size, divisor_override=1)
    return sums.reshape(*lead, gh, gw)
