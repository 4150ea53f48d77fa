"""Qwen2-VL / Qwen2.5-VL image inputs built in torch, so that gradients flow from the judge back into the pixels.

The model's image processor (``Qwen2VLImageProcessor``) works on uint8 images outside autograd. Reward-gradient
training needs the same ``pixel_values`` / ``image_grid_thw`` as a differentiable function of a float image
``x`` ``[3, H, W]`` in [0, 1]:

1. resize ``255 x`` to ``smart_resize(H, W, factor=patch_size * merge_size, min_pixels, max_pixels)`` (both sides
   multiples of 28 for Qwen, the pixel count within the budget) as torchvision resizes the processor's uint8 images
   (bicubic, antialiased: Pillow's algorithm): ``X' = clip(W_h clip(X W_w^T))``, width first, each pass clipped to
   [0, 255], with Pillow's weights: output pixel ``i`` reads input ``j`` with weight ``k((j - c_i + 0.5) / s)``
   normalised over ``j``, ``c_i = (i + 0.5) n_in / n_out``, ``s = max(n_in / n_out, 1)``, ``k`` the cubic kernel
   with ``a = -0.5`` on ``|x| < 2``. The processor also rounds each pass to uint8: the two agree within about one
   grey level, and exactly when no resize is needed;
2. normalise: ``(x - mean) / std`` with the processor's CLIP mean and std;
3. patchify: ``[C, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, C, p, p]``, each patch repeated
   ``temporal_patch_size`` times along a new time axis after ``C``, flattened to
   ``[gh * gw, C * temporal_patch_size * p * p]``; ``image_grid_thw = [1, gh, gw]``.

The text side (:func:`expand_image_tokens`) repeats each ``<|image_pad|>`` ``gh * gw / m^2`` times, as the
processor does. :func:`refiner_rl.vlm.local.LocalVLM.encode_tensors` puts both together.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def image_settings(image_processor) -> dict:
    """The settings of a Qwen2-VL-class image processor that the torch path needs."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return {
        "min_pixels": int(get("shortest_edge")),
        "max_pixels": int(get("longest_edge")),
        "patch_size": int(image_processor.patch_size),
        "merge_size": int(image_processor.merge_size),
        "temporal_patch_size": int(image_processor.temporal_patch_size),
        "mean": [float(v) for v in image_processor.image_mean],
        "std": [float(v) for v in image_processor.image_std],
    }


def resized_size(height: int, width: int, settings: dict) -> tuple[int, int]:
    """``(H', W')`` the processor resizes an ``H x W`` image to (transformers' ``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = settings["patch_size"] * settings["merge_size"]
    return smart_resize(
        height, width, factor=factor, min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"]
    )


@functools.lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` antialiased bicubic resize weights (Pillow's, see the module docstring)."""
    scale = n_in / n_out
    spread = max(scale, 1.0)
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - 2.0 * spread + 0.5), 0), min(int(center + 2.0 * spread + 0.5), n_in)
        x = ((torch.arange(lo, hi, dtype=torch.float64) - center + 0.5) / spread).abs()
        k = torch.where(x < 1, (1.5 * x - 2.5) * x * x + 1, torch.where(x < 2, ((x - 5) * x + 8) * x * -0.5 + 2, 0.0))
        out[i, lo:hi] = k / k.sum()
    return out.float()


def pixel_values(images: Sequence[torch.Tensor], settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [sum_i gh_i * gw_i, C * T * p * p], image_grid_thw [n, 3])`` of float images ``[3, H, W]``
    in [0, 1], differentiable in the images (see the module docstring)."""
    p, m, t = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
    rows, grids = [], []
    for image in images:
        x = image.float() * 255.0
        h, w = resized_size(x.shape[-2], x.shape[-1], settings)
        if w != x.shape[-1]:
            x = (x @ resize_weights(x.shape[-1], w).to(x.device).T).clamp(0.0, 255.0)
        if h != x.shape[-2]:
            x = (resize_weights(x.shape[-2], h).to(x.device) @ x).clamp(0.0, 255.0)
        mean = torch.tensor(settings["mean"], device=x.device).view(-1, 1, 1) * 255.0
        std = torch.tensor(settings["std"], device=x.device).view(-1, 1, 1) * 255.0
        x = (x - mean) / std
        c, gh, gw = x.shape[0], h // p, w // p
        patches = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
        rows.append(patches.reshape(gh * gw, c * t * p * p))
        grids.append([1, gh, gw])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def expand_image_tokens(texts: Sequence[str], grids: torch.Tensor, image_token: str, merge_size: int) -> list[str]:
    """``texts`` with their ``image_token`` occurrences (in order, across texts) each repeated ``t * gh * gw / m^2``
    times, the number of merged vision tokens of the matching image of ``grids``."""
    counts = iter((grids.prod(-1) // merge_size**2).tolist())
    out = []
    for text in texts:
        pieces = text.split(image_token)
        out.append("".join(piece + image_token * next(counts) for piece in pieces[:-1]) + pieces[-1])
    return out
