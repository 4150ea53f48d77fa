"""Region-focused refinement (``focus_crop``): refine a crop around the mask at the working resolution, then paste
it back into the full image with a feathered edge.

1. :func:`focus_boxes`: the box of each mask (its bounding box plus ``margin``), made square where the image allows
   and each side expanded to a multiple of the codec's ``multiple`` (or to the full image side when that is
   smaller), shifted to lie inside the image.
2. :func:`crop_batch`: draft, target and mask (and the reference, per ``crop_reference``) cut at those boxes and
   resized to the working ``size``; the returned :class:`FocusCrop` is what undoing the crop needs.
3. :func:`paste_back_feathered`: the refined crop resized to its box and blended into the full image with
   ``out = full * (1 - w) + crop * w``, where ``w`` is 1 inside the box, ramps from 0 to 1 over ``feather`` pixels
   inside the box's border (linear ``r`` or cosine ``(1 - cos(pi r)) / 2``, ``r = d / feather`` with ``d`` the
   distance of a pixel's centre from the border) and is 0 outside. Sides of a box on the image border get no
   ramp (nothing outside to blend with). Outside the band the result is exactly the draft or exactly the crop.

:func:`focus_crop` does steps 1-2 from the batch's mask and :meth:`FocusCrop.paste_back` step 3, returning both
forms of the result, for rewards and metrics computed on either: the crop form (the refined crop against
``FocusCrop.batch``'s cropped target, mask and reference) or the full form (the pasted image against
``FocusCrop.full_batch``).

All images are tensors ``[B, 3, H, W]`` (masks ``[B, 1, H, W]``) with values in [0, 1]; boxes are ``[B, 4]``
integer tensors ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from refiner_rl.errors import ConfigError, DataError

CropReference = Literal["false", "true", "same_box"]
CROP_REFERENCE = get_args(CropReference)
RAMPS = ("linear", "cosine")


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_boxes(boxes: torch.Tensor, n: int, full_size: tuple[int, int], what: str) -> None:
    H, W = full_size
    if tuple(boxes.shape) != (n, 4):
        raise DataError(
            f"focus_crop: {what}es must be [{n}, 4] (x0, y0, x1, y1) for this batch, got {list(boxes.shape)}"
        )
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise DataError(f"focus_crop: {what} {[x0, y0, x1, y1]} of item {i} is not inside the {H}x{W} image")


def _fit(lo: int, hi: int, want: int, limit: int, multiple: int) -> tuple[int, int]:
    """An interval of length ``want`` rounded up to ``multiple`` (at most ``limit``) centred on ``[lo, hi)``,
    shifted into ``[0, limit)``."""
    length = min(limit, int(math.ceil(max(want, hi - lo) / multiple)) * multiple)
    start = (lo + hi - length) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def expand_boxes(
    bboxes: torch.Tensor, full_size: tuple[int, int], margin: float = 0.125, multiple: int = 16
) -> torch.Tensor:
    """Crop boxes ``[B, 4]`` around region boxes ``bboxes`` ``[B, 4]`` on an image of ``full_size`` (H, W).

    Each box grows by ``margin`` times its larger side on every side; the crop is then square with side
    ``s = max(w, h)`` rounded up to a multiple of ``multiple`` (a side that would exceed the image is the image
    side), centred on the region and shifted inside the image, so it always holds the whole region.
    """
    if margin < 0 or multiple < 1:
        raise ConfigError(f"focus_crop: margin must be >= 0 and multiple >= 1, got {margin} and {multiple}")
    H, W = full_size
    bboxes = torch.as_tensor(bboxes)
    _check_boxes(bboxes, len(bboxes), full_size, "region box")
    boxes = []
    for x0, y0, x1, y1 in bboxes.tolist():
        pad = int(math.ceil(margin * max(x1 - x0, y1 - y0)))
        side = max(x1 - x0, y1 - y0) + 2 * pad
        bx0, bx1 = _fit(int(x0), int(x1), side, W, multiple)
        by0, by1 = _fit(int(y0), int(y1), side, H, multiple)
        boxes.append((bx0, by0, bx1, by1))
    return torch.tensor(boxes, dtype=torch.long, device=bboxes.device)


def mask_bboxes(mask: torch.Tensor) -> torch.Tensor:
    """Bounding boxes ``[B, 4]`` of each mask's pixels >= 0.5; an empty mask raises :class:`DataError`."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise DataError(f"focus_crop: mask must be [B, 1, H, W], got {list(mask.shape)}")
    boxes = []
    for i, m in enumerate(mask[:, 0] >= 0.5):
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if not len(rows):
            raise DataError(
                f"focus_crop: the mask of batch item {i} is empty, so there is no region to crop; give every "
                "record a mask with at least one pixel >= 0.5, or turn focus_crop off"
            )
        boxes.append((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return torch.tensor(boxes, dtype=torch.long, device=mask.device)


def focus_boxes(mask: torch.Tensor, margin: float = 0.125, multiple: int = 16) -> torch.Tensor:
    """Crop boxes ``[B, 4]`` (x0, y0, x1, y1) around each mask of ``mask`` ``[B, 1, H, W]``:
    :func:`expand_boxes` of :func:`mask_bboxes`."""
    return expand_boxes(mask_bboxes(mask), (int(mask.shape[-2]), int(mask.shape[-1])), margin, multiple)


def _resize(x: torch.Tensor, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if nearest:
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def crop_images(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int], nearest: bool = False):
    """Each image ``[B, C, H, W]`` cut at its box and resized to ``size`` (bilinear with antialiasing; nearest for
    masks, re-thresholded at 0.5)."""
    size = _size2(size)
    out = [
        _resize(img[None, :, int(y0) : int(y1), int(x0) : int(x1)], size, nearest)
        for img, (x0, y0, x1, y1) in zip(images, boxes.tolist())
    ]
    out = torch.cat(out)
    return (out >= 0.5).to(images.dtype) if nearest else out


def _scaled_boxes(boxes: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """``boxes`` on an ``src`` (H, W) image moved to a ``dst`` image of another size (rounded outwards)."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    b = boxes.double()
    lo = torch.stack([torch.floor(b[:, 0] * sx), torch.floor(b[:, 1] * sy)], 1)
    hi = torch.stack([torch.ceil(b[:, 2] * sx), torch.ceil(b[:, 3] * sy)], 1)
    out = torch.cat([lo, hi], 1).long()
    out[:, 0::2] = out[:, 0::2].clamp(0, dst[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, dst[0])
    return out


@dataclass
class FocusCrop:
    """A cropped batch and what undoing the crop needs.

    batch: the input batch with ``draft``, ``target``, ``mask`` (and ``reference`` when cropped) replaced by their
        crops at ``size``; other keys are passed through.
    boxes: ``[B, 4]`` crop boxes in the full draft's pixels (give them to :func:`paste_back_feathered`).
    full_size: (H, W) of the full draft.
    ref_boxes: ``[B, 4]`` boxes the reference was cut at, in its own pixels; ``None`` when it was kept whole.
    full_batch: the batch before cropping.
    """

    batch: dict
    boxes: torch.Tensor
    full_size: tuple[int, int]
    ref_boxes: torch.Tensor | None = None
    full_batch: dict | None = None

    def paste_back(
        self, refined_crop: torch.Tensor, feather: float = 2.0, ramp: str = "linear"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both forms of a refinement: ``(full, crop)``, the refined crop pasted into the full draft
        (:func:`paste_back_feathered`; score it against :attr:`full_batch`) and the crop itself (score it against
        :attr:`batch`, the cropped target, mask and reference)."""
        return paste_back_feathered(self.full_batch["draft"], refined_crop, self.boxes, feather, ramp), refined_crop

    def crop_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Score maps ``[B, h, w]`` of full images (any grid, e.g. one value per patch) cut at the crop boxes and
        resized (nearest: NaN stays NaN) to the crop's grid at the same scale, ``[B, h * S / H, w * S / W]``."""
        h, w = int(maps.shape[-2]), int(maps.shape[-1])
        boxes = _scaled_boxes(self.boxes, self.full_size, (h, w))
        size = tuple(int(self.batch["draft"].shape[k]) for k in (-2, -1))
        out_size = (max(1, round(size[0] * h / self.full_size[0])), max(1, round(size[1] * w / self.full_size[1])))
        return torch.cat(
            [
                F.interpolate(m[None, None, y0:y1, x0:x1].float(), size=out_size, mode="nearest")[0]
                for m, (x0, y0, x1, y1) in zip(maps, boxes.tolist())
            ]
        )

    def scored(self, refined_crop: torch.Tensor, settings: FocusSettings) -> tuple[torch.Tensor, dict]:
        """What rewards and metrics see: ``(images, batch)``, the pasted full images and the full batch with
        ``settings.score_on == "full"``, else the refined crop and the cropped batch."""
        if settings.score_on == "crop":
            return refined_crop, self.batch
        return self.paste_back(refined_crop, settings.feather, settings.ramp)[0], self.full_batch


def _crop_reference_mode(crop_reference) -> str:
    mode = str(crop_reference).lower()
    if mode not in CROP_REFERENCE:
        raise ConfigError(f"focus_crop: crop_reference {crop_reference!r} is not one of {', '.join(CROP_REFERENCE)}")
    return mode


def crop_batch(
    batch: dict,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    crop_reference: bool | str = False,
    ref_boxes: torch.Tensor | None = None,
    ref_size: int | tuple[int, int] | None = None,
) -> FocusCrop:
    """Crop ``batch``'s draft, target and mask at ``boxes`` and resize them to ``size``.

    ``crop_reference``: ``false`` keeps the reference whole; ``same_box`` cuts it at the draft's boxes (scaled to
    the reference's size when it differs; right for aligned references); ``true`` cuts it at ``ref_boxes`` (boxes
    in the reference's own pixels, e.g. from :func:`focus_boxes` over where the region's detail lies in it, such as
    the synthetic records' ``ref_box``). A cropped reference is resized to ``ref_size`` (default ``size``).
    Records with several references (``reference``, ``reference_2``, ...) get each one cut on its own: at the
    draft's boxes scaled to its size, or with ``true`` at its own boxes (``ref_boxes`` a list, one ``[B, 4]`` per
    reference); :attr:`FocusCrop.ref_boxes` holds the first one's.
    """
    mode = _crop_reference_mode(crop_reference)
    draft = batch["draft"]
    full_size = (int(draft.shape[-2]), int(draft.shape[-1]))
    _check_boxes(boxes, draft.shape[0], full_size, "crop box")
    out = dict(batch)
    for key in ("draft", "target"):
        if batch.get(key) is not None:
            out[key] = crop_images(batch[key], boxes, size)
    if batch.get("mask") is not None:
        out["mask"] = crop_images(batch["mask"], boxes, size, nearest=True)
    used = None
    if mode != "false":
        from refiner_rl.data.records import reference_columns

        columns = reference_columns(batch)
        if not columns:
            raise DataError(f"focus_crop: crop_reference={mode} but the batch has no reference")
        several = isinstance(ref_boxes, (list, tuple)) and len(columns) > 1
        if several and (len(ref_boxes) != len(columns) or any(b is None for b in ref_boxes)):
            raise ConfigError(
                f"focus_crop: {len(ref_boxes)} sets of ref_boxes for {len(columns)} references; give one per reference"
            )
        for k, key in enumerate(columns):
            ref = batch[key]
            if mode == "same_box":
                cut = _scaled_boxes(boxes, full_size, (int(ref.shape[-2]), int(ref.shape[-1])))
            elif ref_boxes is None or (len(columns) > 1 and not several):
                raise ConfigError(
                    "focus_crop: crop_reference=true needs ref_boxes (where the region's detail is in the reference"
                    f"{', a list with one per reference' if len(columns) > 1 else ''}); pass them, or use "
                    "crop_reference=same_box for aligned references or false to keep it whole"
                )
            else:
                cut = torch.as_tensor(ref_boxes[k] if several else ref_boxes).to(dtype=torch.long, device=ref.device)
                _check_boxes(cut, ref.shape[0], (int(ref.shape[-2]), int(ref.shape[-1])), "reference box")
            out[key] = crop_images(ref, cut, ref_size if ref_size is not None else size)
            used = cut if k == 0 else used
    return FocusCrop(out, boxes, full_size, used, batch)


def focus_crop(
    batch: dict,
    size: int | tuple[int, int],
    *,
    margin: float = 0.125,
    multiple: int = 16,
    crop_reference: bool | str = False,
    ref_boxes: torch.Tensor | None = None,
    ref_size: int | tuple[int, int] | None = None,
) -> FocusCrop:
    """:func:`crop_batch` at the :func:`focus_boxes` of ``batch["mask"]``; undo with :meth:`FocusCrop.paste_back`."""
    boxes = focus_boxes(batch["mask"], margin, multiple)
    return crop_batch(batch, boxes, size, crop_reference, ref_boxes, ref_size)


def feather_weights(
    boxes: torch.Tensor, full_size: tuple[int, int], feather: float, ramp: str = "linear"
) -> torch.Tensor:
    """Blend weights ``[B, 1, H, W]``: 0 outside each box, 1 inside it beyond ``feather`` pixels from its border,
    a linear or cosine ramp between (module docstring); sides on the image border get no ramp."""
    if ramp not in RAMPS:
        raise ConfigError(f"focus_crop: feather ramp {ramp!r} is not one of {', '.join(RAMPS)}")
    if feather < 0:
        raise ConfigError(f"focus_crop: feather must be >= 0 pixels, got {feather}")
    H, W = full_size
    ys = torch.arange(H, dtype=torch.float32, device=boxes.device) + 0.5
    xs = torch.arange(W, dtype=torch.float32, device=boxes.device) + 0.5
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        # distance of each pixel centre from the nearest box side that is not on the image border
        dx = torch.minimum(xs - x0 if x0 > 0 else xs + math.inf, x1 - xs if x1 < W else xs + math.inf)
        dy = torch.minimum(ys - y0 if y0 > 0 else ys + math.inf, y1 - ys if y1 < H else ys + math.inf)
        d = torch.minimum(dy[:, None], dx[None, :])
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        r = (d / feather).clamp(0, 1) if feather > 0 else torch.ones_like(d)
        if ramp == "cosine":
            r = torch.where(r >= 1, torch.ones_like(r), 0.5 - 0.5 * torch.cos(math.pi * r))
        out.append(torch.where(inside, r, torch.zeros_like(r)))
    return torch.stack(out)[:, None]


def paste_back_feathered(
    full: torch.Tensor, refined_crop: torch.Tensor, box: torch.Tensor, feather: float = 2.0, ramp: str = "linear"
) -> torch.Tensor:
    """``full`` ``[B, C, H, W]`` with each refined crop ``[B, C, h, w]`` resized to its ``box`` (``[B, 4]`` or one
    ``[4]`` box for all) and blended in: ``full * (1 - w) + crop * w`` with ``w`` from :func:`feather_weights`."""
    if box.dim() == 1:
        box = box[None].expand(full.shape[0], 4)
    H, W = full.shape[-2:]
    _check_boxes(box, full.shape[0], (H, W), "paste box")
    placed = full.clone()
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        placed[i, :, y0:y1, x0:x1] = _resize(refined_crop[i : i + 1].to(full.dtype), (y1 - y0, x1 - x0))[0]
    w = feather_weights(box, (H, W), feather, ramp).to(full.dtype)
    return full * (1 - w) + placed * w


ScoreOn = Literal["full", "crop"]
SCORE_ON = get_args(ScoreOn)


@dataclass
class FocusSettings:
    """How a trainer, the sampler or the evaluator refines a region in focus.

    size: working resolution of the crop (a square side, a multiple of the codec's ``multiple``); ``None`` uses the
        shorter side of the batch's images rounded down to that multiple.
    margin, crop_reference, feather, ramp: as :func:`focus_crop` and :func:`paste_back_feathered`.
    score_on: ``full`` scores rewards and metrics on the refined crop pasted back into the full image; ``crop`` on
        the refined crop against the cropped target, mask and reference.
    """

    size: int | None = None
    margin: float = 0.125
    crop_reference: str = "false"
    feather: float = 2.0
    ramp: str = "linear"
    score_on: str = "full"

    def __post_init__(self):
        self.crop_reference = _crop_reference_mode(self.crop_reference)
        if self.score_on not in SCORE_ON:
            raise ConfigError(f"focus_crop: score_on {self.score_on!r} is not one of {', '.join(SCORE_ON)}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"focus_crop: the working size must be >= 1 pixel or unset, got {self.size}")
        if self.margin < 0 or self.feather < 0 or self.ramp not in RAMPS:
            raise ConfigError(
                f"focus_crop: margin and feather must be >= 0 and ramp one of {', '.join(RAMPS)}, got margin "
                f"{self.margin}, feather {self.feather}, ramp {self.ramp!r}"
            )

    def working_size(self, batch: dict, multiple: int) -> int:
        """The crop's side: ``size``, or the batch's shorter image side rounded down to ``multiple``."""
        side = self.size if self.size is not None else min(batch["draft"].shape[-2:])
        if side % multiple or side < multiple:
            if self.size is not None:
                raise ConfigError(f"focus_crop: focus_size {self.size} must be a positive multiple of {multiple}")
            side = max(multiple, side // multiple * multiple)
        return int(side)

    def crop(self, batch: dict, multiple: int) -> FocusCrop:
        """:func:`focus_crop` of ``batch`` with these settings; boxes are multiples of ``multiple`` (the codec's
        size multiple) where the image allows. ``crop_reference=true`` reads the batch's ``ref_box`` column."""
        ref_boxes = batch.get("ref_box") if self.crop_reference == "true" else None
        if ref_boxes is not None:
            from refiner_rl.data.records import reference_columns

            n = len(reference_columns(batch))
            if n > 1:  # several references: one box column each (ref_box, ref_box_2, ...)
                ref_boxes = [ref_boxes, *(batch.get(f"ref_box_{k}") for k in range(2, n + 1))]
        return focus_crop(
            batch,
            self.working_size(batch, multiple),
            margin=self.margin,
            multiple=multiple,
            crop_reference=self.crop_reference,
            ref_boxes=ref_boxes,
        )


@dataclass
class FocusArguments:
    """Config fields of region-focused refinement, shared by the SFT and GRPO configs (see :class:`FocusSettings`).

    Turn it on when the region is small in a large image (text on a label, a logo on a cap): the crop then gets
    the model's whole working resolution instead of a few tokens of it.
    """

    focus_crop: bool = field(
        default=False,
        metadata={
            "help": "Refine a crop around the mask (bbox + margin) at the working resolution, pasted back feathered."
        },
    )
    focus_size: int | None = field(
        default=None, metadata={"help": "Working side of the crop in pixels (default: the images' shorter side)."}
    )
    focus_margin: float = field(
        default=0.125, metadata={"help": "Margin around the mask's box, times its longer side."}
    )
    focus_crop_reference: CropReference = field(
        default="false",
        metadata={
            "help": "Reference: false (keep it whole), same_box (cut at the draft's box), true (cut at ref_box)."
        },
    )
    focus_feather: float = field(default=2.0, metadata={"help": "Width in pixels of the paste-back blend ramp."})
    focus_score_on: ScoreOn = field(
        default="full", metadata={"help": "Score rewards and metrics on the pasted full image (full) or the crop."}
    )

    def focus_settings(self) -> FocusSettings | None:
        """The :class:`FocusSettings` these fields describe (checked), or ``None`` with ``focus_crop`` off."""
        settings = FocusSettings(
            self.focus_size,
            self.focus_margin,
            self.focus_crop_reference,
            self.focus_feather,
            score_on=self.focus_score_on,
        )
        return settings if self.focus_crop else None
