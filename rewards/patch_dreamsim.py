"""``patch_dreamsim``: DreamSim similarity of the sample and the ground truth, patch by patch.

OmniRefiner (arXiv 2511.19990) scores each GRPO sample with a DreamSim term "for overall consistency" and calls
the reward patch-wise; its patch size and selection are not published, so they are options here:

- ``selection: bbox`` (default): patches of ``patch_size`` tiling the mask's bounding box grown by
  ``dilation`` pixels (and to at least one patch); no mask = the whole image. An empty mask scores ``None``.
- ``selection: grid``: every cell of a ``patch_size`` grid over the whole image.
- ``selection: both``: the union of the two (the region is counted twice: once in its own tiling, once in
  the grid, so it weighs more than the context).

Every patch is cropped from the sample and from the ``compare_to`` image (``target``, default, or
``reference``, which must then have the sample's size), resized to DreamSim's 224 and embedded in batched
forwards (``batch_size`` pairs at a time, all patches of all samples together; 64 suits a GPU, on a CPU
8-16 is as fast: there the forward is compute-bound and batching gains nothing). Per patch:
``reward = 1 - distance = cos(embed(sample patch), embed(other patch))`` (DreamSim's distance is
``1 - cosine``). The image's reward is the mean over patches (``aggregate: mean``) or the mean weighted by how
many mask pixels each patch owns (``aggregate: area``). :meth:`score_maps` also returns the per-patch values
on the ``patch_size`` grid over the whole image (NaN outside the selection).

Weights. ``dreamsim`` 0.2.1 downloads its checkpoint (and, for DINO, the ``facebookresearch/dino`` torch-hub
code and backbone) into ``cache_dir`` on first use. We never download implicitly: when files are missing,
construction fails at once with the command that fetches them, unless ``allow_download: true`` and
``HF_HUB_OFFLINE`` is unset. ``dreamsim_type`` defaults to ``dino_vitb16``: one ViT-B/16. The package's own
default, ``ensemble``, runs three ViT-B backbones (DINO, CLIP, OpenCLIP), three times the cost per patch, and
a patch reward runs thousands of patches per step; choose ``ensemble`` where its accuracy is worth it.

``cache_dir`` defaults to a per-user cache, ``$XDG_CACHE_HOME/refiner_rl/dreamsim`` (``~/.cache/refiner_rl/dreamsim``
without ``XDG_CACHE_HOME``; :func:`default_cache_dir`). Tests and the benchmark write a cache folder with the
same layout and random weights (``tests/dreamsim_cache.py``) and load it through the same ``dreamsim.dreamsim(...)``
call as a real run. :meth:`PatchDreamSim.from_model` injects a prebuilt model.
The model is built outside ZeRO-3 partitioning (:func:`outside_zero3_init`), frozen, and run under
``torch.inference_mode``; :meth:`PatchDreamSim.score_tensors` runs the same computation with gradient into the sample
(reward-gradient training; the model's weights are differentiated through, never trained).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
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
from refiner_rl.scoring.patches import (
    Patch,
    box_sums,
    crop_resize,
    grid_patches,
    grow_box,
    mask_bbox,
    splat_to_grid,
    tile_box,
)
from refiner_rl.scoring.registry import register_reward

DREAMSIM_SIZE = 224  # DreamSim's input resolution
DEFAULT_DREAMSIM_TYPE = "dino_vitb16"

# What dreamsim 0.2.1's download_weights() checks for, per type...
_CHECKPOINT_FILES = {
    "ensemble": [
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora",
    ],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "dinov2_vitb14": ["dinov2_vitb14_pretrain.pth", "dinov2_vitb14_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
    "synclr_vitb16": ["synclr_vit_b_16.pth", "synclr_vitb16_single_lora"],
    "dino_vitb16_patch": ["dino_vitb16_pretrain.pth", "dino_vitb16_patch_lora"],
    "dinov2_vitb14_patch": ["dinov2_vitb14_pretrain.pth", "dinov2_vitb14_patch_lora"],
}
# ...plus what its ViTExtractor fetches through torch.hub (hub dir = cache_dir) for DINO backbones.
_TORCH_HUB_FILES = {
    "dino_vitb16": ["facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth"],
    "dinov2_vitb14": ["facebookresearch_dinov2_main/hubconf.py", "checkpoints/dinov2_vitb14_pretrain.pth"],
}
_LORA_DIRS = {"ensemble": "ensemble_lora"}


def _backbones(dreamsim_type: str) -> list[str]:
    from dreamsim.config import dreamsim_args

    return dreamsim_args["model_config"][dreamsim_type]["model_type"].split(",")


def required_cache_files(dreamsim_type: str) -> list[str]:
    """Paths (relative to ``cache_dir``) a fully offline ``dreamsim(pretrained=True)`` call reads."""
    if dreamsim_type not in _CHECKPOINT_FILES:
        raise ValueError(
            f"patch_dreamsim: unknown dreamsim_type {dreamsim_type!r}; choose one of {', '.join(_CHECKPOINT_FILES)}"
        )
    files = list(_CHECKPOINT_FILES[dreamsim_type])
    lora_dir = next(f for f in files if f.endswith("_lora"))
    files.append(f"{lora_dir}/adapter_config.json")
    for backbone in _backbones(dreamsim_type):
        files += _TORCH_HUB_FILES.get(backbone, [])
    return files


def missing_cache_files(cache_dir: str, dreamsim_type: str) -> list[str]:
    return [f for f in required_cache_files(dreamsim_type) if not os.path.exists(os.path.join(cache_dir, f))]


def default_cache_dir() -> str:
    """Where the DreamSim checkpoint folder is looked for when ``cache_dir`` is not set: a per-user cache,
    ``$XDG_CACHE_HOME/refiner_rl/dreamsim`` (``~/.cache/refiner_rl/dreamsim`` without ``XDG_CACHE_HOME``), not
    dreamsim's own ``./models`` in the working directory."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "refiner_rl", "dreamsim")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def keep_torch_hub_dir() -> Iterator[None]:
    """dreamsim calls ``torch.hub.set_dir(cache_dir)`` (process-wide); put the previous value back."""
    saved = getattr(torch.hub, "_hub_dir", None)
    try:
        yield
    finally:
        torch.hub._hub_dir = saved


def load_dreamsim(
    cache_dir: str | os.PathLike | None = None,
    dreamsim_type: str = DEFAULT_DREAMSIM_TYPE,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> torch.nn.Module:
    """The DreamSim model from ``cache_dir`` through ``dreamsim.dreamsim(pretrained=True, ...)``, frozen.

    Missing files raise :class:`~refiner_rl.errors.CheckpointError` before dreamsim tries the network, unless downloads are
    allowed (``allow_download`` and no ``HF_HUB_OFFLINE``)."""
    cache_dir = os.path.abspath(os.fspath(cache_dir if cache_dir is not None else default_cache_dir()))
    missing = missing_cache_files(cache_dir, dreamsim_type)
    if missing and (not allow_download or _offline()):
        why = "HF_HUB_OFFLINE is set" if _offline() else "allow_download is false"
        raise CheckpointError(
            f"patch_dreamsim: DreamSim weights for dreamsim_type={dreamsim_type!r} are not in cache_dir={cache_dir!r} "
            f"(missing: {', '.join(missing)}) and downloads are off ({why}). Fetch them once on a machine with "
            f"internet:\n    python -c \"from dreamsim import dreamsim; dreamsim(pretrained=True, device='cpu', "
            f"cache_dir='{cache_dir}', dreamsim_type='{dreamsim_type.removesuffix('_patch')}'"
            f'{", use_patch_model=True" if dreamsim_type.endswith("_patch") else ""})"\n'
            f"then copy that folder to this machine and set `cache_dir: {cache_dir}` in the recipe's patch_dreamsim "
            "entry (or set `allow_download: true` where the machine is online)."
        )
    from dreamsim import dreamsim

    is_patch = dreamsim_type.endswith("_patch")
    # dreamsim prints progress on stdout; keep stdout clean for `refiner-rl rewards score --json`.
    with (
        outside_zero3_init(),
        keep_torch_hub_dir(),
        contextlib.redirect_stdout(sys.stderr),
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=[]),  # DINOHead's random init must not move the caller's RNG
    ):
        # dreamsim wraps the model in LoRA twice by design (get_peft_model, then PeftModel.from_pretrained)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated")
        model, _ = dreamsim(
            pretrained=True,
            device=str(device),
            cache_dir=cache_dir,
            normalize_embeds=True,
            dreamsim_type=dreamsim_type.removesuffix("_patch") if is_patch else dreamsim_type,
            use_patch_model=is_patch,
        )
    return freeze(model)


@register_reward
class PatchDreamSim(Reward):
    """1 - DreamSim distance between sample and ground-truth patches (mask box and/or grid), with a per-patch map."""

    name = "patch_dreamsim"
    required_fields = ("target",)
    optional_fields = ("mask",)
    provides_maps = True
    differentiable = True

    def __init__(
        self,
        patch_size: int = 64,
        compare_to: Literal["target", "reference"] = "target",
        selection: Literal["bbox", "grid", "both"] = "bbox",
        dilation: int = 16,
        aggregate: Literal["mean", "area"] = "mean",
        cache_dir: str | None = None,
        dreamsim_type: str = DEFAULT_DREAMSIM_TYPE,
        batch_size: int = 64,
        allow_download: bool = False,
        model: torch.nn.Module | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(device=device, dtype=dtype)
        if int(patch_size) < 1:
            raise ValueError(f"patch_dreamsim: patch_size must be a positive number of pixels, got {patch_size!r}")
        if compare_to not in ("target", "reference"):
            raise ValueError(f"patch_dreamsim: compare_to must be 'target' or 'reference', got {compare_to!r}")
        if selection not in ("bbox", "grid", "both"):
            raise ValueError(f"patch_dreamsim: selection must be 'bbox', 'grid' or 'both', got {selection!r}")
        if aggregate not in ("mean", "area"):
            raise ValueError(f"patch_dreamsim: aggregate must be 'mean' or 'area', got {aggregate!r}")
        if int(batch_size) < 1 or int(dilation) < 0:
            raise ValueError("patch_dreamsim: batch_size must be >= 1 and dilation >= 0")
        self.patch_size, self.dilation, self.batch_size = int(patch_size), int(dilation), int(batch_size)
        self.compare_to, self.selection, self.aggregate = compare_to, selection, aggregate
        self.required_fields = (compare_to,)
        if model is None:
            model = load_dreamsim(cache_dir, dreamsim_type, self.device, allow_download=allow_download)
        self.model = freeze(model).to(device=self.device, dtype=self.dtype)

    @classmethod
    def from_model(cls, model: torch.nn.Module, **options) -> PatchDreamSim:
        """Use a prebuilt model with DreamSim's interface (``embed(img) -> [B, D]`` or
        ``forward(img_a, img_b) -> distance [B]``, images ``[B, 3, 224, 224]`` in [0, 1])."""
        return cls(model=model, **options)

    def to(self, device: str | torch.device) -> PatchDreamSim:
        super().to(device)
        self.model.to(self.device)
        return self

    # -- geometry -----------------------------------------------------------------------------------
    def select_patches(
        self, height: int, width: int, mask: torch.Tensor | None
    ) -> tuple[list[Patch], torch.Tensor] | None:
        """The patches to score and their aggregation weights (``None`` = cannot score: empty mask)."""
        patches: list[Patch] = []
        if self.selection in ("grid", "both"):
            patches += grid_patches(height, width, self.patch_size)
        if self.selection in ("bbox", "both"):
            box = (0, height, 0, width) if mask is None else mask_bbox(mask, self.dilation)
            if box is None:
                return None
            patches += tile_box(grow_box(box, self.patch_size, height, width), self.patch_size)
        owners = [p.owner for p in patches]
        if self.aggregate == "mean":
            weights = torch.ones(len(patches))
        elif mask is None:
            weights = torch.tensor([float((b[1] - b[0]) * (b[3] - b[2])) for b in owners])
        else:
            weights = box_sums(mask.clamp(0, 1), owners)
        if float(weights.sum()) <= 0:
            return None
        return patches, weights

    # -- model --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def patch_distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """DreamSim distance ``1 - cos`` for pairs of 224 crops ``[P, 3, 224, 224]``, ``batch_size`` pairs per
        forward (both sides in one forward when the model exposes ``embed``)."""
        out = []
        for s in range(0, a.shape[0], self.batch_size):
            x = a[s : s + self.batch_size].to(self.device, self.dtype)
            y = b[s : s + self.batch_size].to(self.device, self.dtype)
            out.append(self._distance(x, y).float().reshape(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "is_patch", False) or not hasattr(self.model, "embed"):
            return self.model(x, y)  # DreamSim's own forward (pools patch tokens for *_patch models)
        e = self.model.embed(torch.cat([x, y])).reshape(2 * x.shape[0], -1)
        return 1.0 - F.cosine_similarity(e[: x.shape[0]], e[x.shape[0] :], dim=-1)

    # -- scoring ------------------------------------------------------------------------------------
    def _jobs(self, completions: Sequence[Any], columns: dict) -> list[tuple]:
        """``(sample index, sample image, other image, patches, weights)`` for each sample that can be scored."""
        jobs = []
        for i, completion in enumerate(completions):
            x = as_image_tensor(completion).to(self.device)
            other = required_value(columns, self.compare_to, i, self.name)
            y = as_image_tensor(other).detach().to(self.device)
            check_same_size(x, y, "completion", self.compare_to, self.name)
            mask = column_value(columns, "mask", i)
            if mask is not None:
                mask = as_image_tensor(mask, channels=1).detach().cpu()
                check_same_size(x, mask, "completion", "mask", self.name)
            selected = self.select_patches(x.shape[-2], x.shape[-1], mask)
            if selected is not None:
                jobs.append((i, x, y, *selected))
        return jobs

    def score_maps(self, prompts: Sequence[str], completions: Sequence[Any], **columns):
        n = len(completions)
        jobs = self._jobs(completions, columns)

        # Every patch of every sample, in chunks of batch_size pairs: crops are made per chunk so memory stays
        # bounded by the chunk, not by the batch.
        flat = [(j, k) for j, job in enumerate(jobs) for k in range(len(job[3]))]
        dist = torch.empty(len(flat))
        for s in range(0, len(flat), self.batch_size):
            chunk = flat[s : s + self.batch_size]
            a, b = [], []
            for j in dict.fromkeys(j for j, _ in chunk):
                boxes = [jobs[j][3][k].content for jj, k in chunk if jj == j]
                a.append(crop_resize(jobs[j][1], boxes, DREAMSIM_SIZE))
                b.append(crop_resize(jobs[j][2], boxes, DREAMSIM_SIZE))
            dist[s : s + len(chunk)] = self.patch_distances(torch.cat(a), torch.cat(b))

        scores: list[float | None] = [None] * n
        maps: list[torch.Tensor | None] = [None] * n
        start = 0
        for i, x, _, patches, weights in jobs:
            values = 1.0 - dist[start : start + len(patches)]
            start += len(patches)
            scores[i] = float((values * weights).sum() / weights.sum())
            maps[i] = splat_to_grid([p.owner for p in patches], values, x.shape[-2], x.shape[-1], self.patch_size)
        return scores, maps

    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        return self.score_maps(prompts, completions, **columns)[0]

    def score_tensors(self, images: torch.Tensor, columns: dict) -> torch.Tensor:
        """The patch-mean (or area-weighted) ``1 - distance`` per image of ``images`` ``[B, 3, H, W]``,
        differentiable through the crops, their resize and DreamSim (frozen); NaN where the mask is empty."""
        out = torch.full((images.shape[0],), float("nan"), device=images.device)
        for i, x, y, patches, weights in self._jobs(list(images), columns):
            boxes = [p.content for p in patches]
            a, b = crop_resize(x, boxes, DREAMSIM_SIZE), crop_resize(y, boxes, DREAMSIM_SIZE)
            dist = torch.cat(
                [
                    self._distance(a[s : s + self.batch_size].to(self.dtype), b[s : s + self.batch_size].to(self.dtype))
                    .float()
                    .reshape(-1)
                    for s in range(0, a.shape[0], self.batch_size)
                ]
            )
            w = weights.to(dist.device)
            out = out.index_put(
                (torch.tensor([i], device=out.device),), (((1.0 - dist) * w).sum() / w.sum()).to(out.device)
            )
        return out
