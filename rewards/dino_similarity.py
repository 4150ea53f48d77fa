"""``dino_similarity``: cosine similarity of DINOv2 embeddings of the sample and the ground truth.

OmniRefiner reports "DINOv2 similarity" (arXiv 2511.19990); this reward computes it, mask-aware:

- ``region: bbox`` (default): both images are cropped to the mask's bounding box grown by ``dilation``
  pixels (no mask = whole image; an empty mask scores ``None``);
- ``region: full``: the whole images.

The crop is resized to ``image_size`` (224: DINOv2's training resolution, 16 x 16 tokens of 14 px) and
normalised with ImageNet mean/std, as DINOv2's image processor does (we resize the whole crop instead of
resize-then-centre-crop, so nothing of the region is cut off). ``pooling: cls`` compares the final
(layer-normed) CLS tokens, ``pooling: mean`` the mean of the patch tokens. With ``region: full`` the reward
also gives a map: per patch token, the cosine similarity of the two images' tokens at that position, on a
``image_size/14`` grid over the whole image (``bbox`` crops do not lie on a whole-image grid: no map there).

The model is ``transformers.Dinov2Model`` loaded with ``from_pretrained`` from ``model_name_or_path`` (hub id
or local folder, safetensors only, no remote code), built outside ZeRO-3 partitioning, frozen, and run in
inference mode. :meth:`DinoSimilarity.score_tensors` is the same computation with gradient into the sample
(the frozen model is differentiated through, never trained). Offline (``HF_HUB_OFFLINE=1``) a hub id must already be in the Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from refiner_rl.errors import CheckpointError
from refiner_rl.scoring.base import (
    Reward,
    as_image_tensor,
    check_same_size,
    column_value,
    freeze,
    outside_zero3_init,
    required_value,
)
from refiner_rl.scoring.patches import mask_bbox
from refiner_rl.scoring.registry import register_reward

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_dinov2(
    model_name_or_path: str,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
):
    """``Dinov2Model.from_pretrained`` with safetensors, frozen; errors say how to get the weights offline."""
    from transformers import Dinov2Model

    try:
        with outside_zero3_init():
            model = Dinov2Model.from_pretrained(
                model_name_or_path, revision=revision, use_safetensors=True, dtype=dtype
            )
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"dino_similarity: cannot load DINOv2 from model_name_or_path={model_name_or_path!r} ({e}). Offline, point "
            "it at a local folder holding config.json and model.safetensors, fetched once on a machine with internet, "
            f"e.g. `hf download {model_name_or_path} --local-dir DIR`, then set `model_name_or_path: DIR`."
        ) from e
    return freeze(model).to(device)


@register_reward
class DinoSimilarity(Reward):
    """Cosine similarity of DINOv2 embeddings (mask box or full image) vs the target or reference."""

    name = "dino_similarity"
    required_fields = ("target",)
    optional_fields = ("mask",)
    provides_maps = True
    differentiable = True

    def __init__(
        self,
        model_name_or_path: str = "facebook/dinov2-small",
        compare_to: Literal["target", "reference"] = "target",
        region: Literal["bbox", "full"] = "bbox",
        dilation: int = 16,
        pooling: Literal["cls", "mean"] = "cls",
        image_size: int = 224,
        batch_size: int = 32,
        revision: str | None = None,
        model: torch.nn.Module | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(device=device, dtype=dtype)
        if compare_to not in ("target", "reference"):
            raise ValueError(f"dino_similarity: compare_to must be 'target' or 'reference', got {compare_to!r}")
        if region not in ("bbox", "full"):
            raise ValueError(f"dino_similarity: region must be 'bbox' or 'full', got {region!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"dino_similarity: pooling must be 'cls' or 'mean', got {pooling!r}")
        self.compare_to, self.region, self.pooling = compare_to, region, pooling
        self.dilation, self.image_size, self.batch_size = int(dilation), int(image_size), int(batch_size)
        self.required_fields = (compare_to,)
        self.provides_maps = region == "full"
        if model is None:
            model = load_dinov2(model_name_or_path, self.device, self.dtype, revision)
        self.model = freeze(model).to(device=self.device, dtype=self.dtype)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def to(self, device: str | torch.device) -> DinoSimilarity:
        super().to(device)
        self.model.to(self.device)
        return self

    def _prepare(self, image: torch.Tensor, box) -> torch.Tensor:
        y0, y1, x0, x1 = box
        crop = image[None, :, y0:y1, x0:x1].float()
        crop = F.interpolate(
            crop, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
        )
        mean, std = self._mean.to(crop.device), self._std.to(crop.device)
        return ((crop.clamp(0, 1) - mean) / std)[0]

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final layer-normed tokens ``[B, 1 + T, D]`` (CLS first, float32 on the model's device), ``batch_size``
        images per forward; differentiable with respect to ``pixels`` when gradients are on."""
        out = []
        for s in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[s : s + self.batch_size].to(self.device, self.dtype)
            out.append(self.model(pixel_values=chunk).last_hidden_state.float())
        return torch.cat(out)

    @torch.inference_mode()
    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._forward(pixels).cpu()

    def _pairs(self, completions: Sequence[Any], columns: dict) -> tuple[list[int], list, list]:
        """The samples that can be scored and their prepared crops (sample, ``compare_to`` image), same box each."""
        index, a, b = [], [], []
        for i, completion in enumerate(completions):
            x = as_image_tensor(completion)
            other = required_value(columns, self.compare_to, i, self.name)
            y = as_image_tensor(other).to(x.device)
            check_same_size(x, y, "completion", self.compare_to, self.name)
            box = (0, x.shape[-2], 0, x.shape[-1])
            mask = column_value(columns, "mask", i)
            if self.region == "bbox" and mask is not None:
                mask = as_image_tensor(mask, channels=1).detach().cpu()
                check_same_size(x, mask, "completion", "mask", self.name)
                box = mask_bbox(mask, self.dilation)
                if box is None:  # empty mask: nothing to compare
                    continue
            index.append(i)
            a.append(self._prepare(x, box))
            b.append(self._prepare(y.detach(), box))
        return index, a, b

    def _embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(1)

    def score_maps(self, prompts: Sequence[str], completions: Sequence[Any], **columns):
        n = len(completions)
        index, a, b = self._pairs(completions, columns)
        scores: list[float | None] = [None] * n
        maps: list[torch.Tensor | None] = [None] * n
        if not index:
            return scores, maps
        tokens = self._tokens(torch.stack(a + b))
        ta, tb = tokens[: len(index)], tokens[len(index) :]
        sims = F.cosine_similarity(self._embeddings(ta), self._embeddings(tb), dim=-1)
        grid = self.image_size // self._patch_size()
        for j, i in enumerate(index):
            scores[i] = float(sims[j])
            if self.provides_maps and ta.shape[1] - 1 == grid * grid:
                maps[i] = F.cosine_similarity(ta[j, 1:], tb[j, 1:], dim=-1).reshape(grid, grid)
        return scores, maps

    def score_tensors(self, images: torch.Tensor, columns: dict) -> torch.Tensor:
        """The cosine similarity per image of ``images`` ``[B, 3, H, W]``, differentiable through the crop, the
        resize and DINOv2 (whose weights stay frozen); NaN where the mask is empty."""
        index, a, b = self._pairs(list(images), columns)
        out = torch.full((images.shape[0],), float("nan"), device=images.device)
        if not index:
            return out
        ea = self._embeddings(self._forward(torch.stack(a)))
        with torch.no_grad():
            eb = self._embeddings(self._forward(torch.stack(b)))
        sims = F.cosine_similarity(ea, eb, dim=-1).to(out.device)
        return out.index_put((torch.tensor(index, device=out.device),), sims)

    def _patch_size(self) -> int:
        p = getattr(getattr(self.model, "config", None), "patch_size", 14)
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        return self.score_maps(prompts, completions, **columns)[0]
