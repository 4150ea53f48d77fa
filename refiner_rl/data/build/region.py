"""Stage 2, region and reference: each clean image -> ``regions_per_image`` (target, mask, reference) records.

Region (a box; the mask is the box, or the given mask):
- from ``region_column``: the box or mask stage 1 carried over (one region per image);
- from ``region_detector`` (``"pkg.module:function"``, image -> boxes, e.g. a face detector): one of its boxes;
- otherwise automatic, where the image is rich in detail. The detail energy of a pixel is the high-frequency part
  of the image, ``E = mean_c |I - G_1 * I|`` (``G_1``: Gaussian blur of radius 1 px; text, edges and fine texture
  score high, flat or smooth areas near 0). A square of side ``s`` (``region_fraction`` of the shorter side, drawn
  per region) is scored by its mean ``E`` on a grid of stride ``s / 4``; one window is drawn at random among those
  scoring at least both ``min_detail`` and 0.8 times the best window, and windows overlapping it are removed before
  the next region. An image with no window reaching ``min_detail`` is dropped as ``flat``.

Reference (unless ``reference_column`` gives one): a crop around the region (the region box grown by
``reference_margin`` of its side, made square and a multiple of ``multiple`` by
:func:`refiner_rl.focus.expand_boxes`), seen through a transform ``T`` from
:func:`refiner_rl.data.synthetic.unaligned_transform` of a ``reference_geometry`` drawn per record (``zoomed``:
magnified by ``reference_zoom_range`` and placed anywhere in the frame; ``shifted``: panned; ``view``: a perspective
warp), composed with a perspective warp of ``reference_warp`` for the first two, and resampled bicubic, so the
reference is never pixel-aligned with the target. Pixels the transform takes beyond the image are mirrored.
Each record keeps ``ref_transform`` (the 3x3 map from target pixels ``(x, y, 1)`` to reference pixels, row-major)
and ``ref_box`` (where the region's detail lies in the reference), as the synthetic records do.
"""

from __future__ import annotations

import functools
import importlib
import math
import zlib

import datasets
import numpy as np
import torch
from PIL import Image, ImageFilter

from refiner_rl.data.build.common import DROP, StageContext, dropped, from_png, kept, record_rng, to_array, to_png
from refiner_rl.data.synthetic import parse_geometry, unaligned_transform
from refiner_rl.errors import ConfigError, DataError
from refiner_rl.focus import expand_boxes

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "target": datasets.Value("binary"),
        "mask": datasets.Value("binary"),
        "reference": datasets.Value("binary"),
        "region": datasets.Sequence(datasets.Value("int32")),
        "ref_geometry": datasets.Value("string"),
        "ref_transform": datasets.Sequence(datasets.Value("float64")),
        "ref_box": datasets.Sequence(datasets.Value("int32")),
        **DROP,
    }
)
EMPTY = {
    "id": "",
    "prompt": "",
    "target": b"",
    "mask": b"",
    "reference": b"",
    "region": [],
    "ref_geometry": "",
    "ref_transform": [],
    "ref_box": [],
}


def detail_energy(img: Image.Image) -> np.ndarray:
    """``E = mean_c |I - G_1 * I|`` per pixel, ``[H, W]`` in [0, 1] (module docstring)."""
    return np.abs(to_array(img) - to_array(img.filter(ImageFilter.GaussianBlur(1)))).mean(-1)


def window_scores(energy: np.ndarray, side: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean energy of every ``side`` x ``side`` window on a ``stride`` grid: ``(scores, x0s, y0s)``, flat arrays."""
    h, w = energy.shape
    ii = np.pad(energy.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys, xs = np.arange(0, h - side + 1, stride), np.arange(0, w - side + 1, stride)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    total = ii[y0 + side, x0 + side] - ii[y0, x0 + side] - ii[y0 + side, x0] + ii[y0, x0]
    return (total / side**2).ravel(), x0.ravel(), y0.ravel()


def auto_regions(img: Image.Image, rng: np.random.Generator, n: int, fraction, min_detail: float) -> list[list[int]]:
    """Up to ``n`` detail-rich square boxes ``[x0, y0, x1, y1]`` (module docstring); ``[]`` when the image is flat."""
    energy = detail_energy(img)
    h, w = energy.shape
    boxes: list[list[int]] = []
    for _ in range(n):
        side = max(4, int(round(rng.uniform(*fraction) * min(h, w))))
        scores, x0, y0 = window_scores(energy, side, max(1, side // 4))
        for bx0, by0, bx1, by1 in boxes:  # no overlap with the regions already drawn
            scores = np.where((x0 < bx1) & (x0 + side > bx0) & (y0 < by1) & (y0 + side > by0), -1.0, scores)
        good = np.flatnonzero(scores >= max(min_detail, 0.8 * float(scores.max())))
        if not len(good):
            break
        k = int(good[rng.integers(len(good))])
        boxes.append([int(x0[k]), int(y0[k]), int(x0[k]) + side, int(y0[k]) + side])
    return boxes


@functools.cache
def load_detector(path: str):
    """The function ``"pkg.module:function"`` (or ``"pkg.module.function"``) names."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"`region_detector` {path!r} cannot be imported ({type(e).__name__}: {e})") from e


def detected_regions(img: Image.Image, rng: np.random.Generator, n: int, detector: str) -> list[list[int]]:
    """Up to ``n`` of the detector's boxes (drawn at random, clipped to the image, empty ones left out)."""
    w, h = img.size
    boxes = []
    for b in load_detector(detector)(img) or []:
        x0, y0, x1, y1 = (int(round(float(v))) for v in list(b)[:4])
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
    order = rng.permutation(len(boxes))[:n] if boxes else []
    return [boxes[int(i)] for i in order]


def _project(t: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ t.T
    return p[:, :2] / p[:, 2:]


def warped_reference(img: Image.Image, box: list[int], rng: np.random.Generator, config) -> dict:
    """The reference of one region (module docstring): image, geometry, ``ref_transform`` and ``ref_box``."""
    w, h = img.size
    crop = expand_boxes(torch.tensor([box]), (h, w), config.reference_margin, config.multiple)[0].tolist()
    cx0, cy0 = crop[0], crop[1]
    size = max(crop[2] - crop[0], crop[3] - crop[1])
    side = max(box[2] - box[0], box[3] - box[1])
    rx0, ry0 = min(box[0] - cx0, size - side), min(box[1] - cy0, size - side)
    probs = parse_geometry(config.reference_geometry)
    kind = str(rng.choice(list(probs), p=list(probs.values())))
    opts = {
        "zoom_range": (config.reference_zoom_range[0], min(config.reference_zoom_range[1], size / side)),
        "shift_fraction": config.reference_shift_fraction,
        "shift_step": 1,
        "warp": config.reference_warp,
    }
    if kind == "zoomed" and opts["zoom_range"][0] > opts["zoom_range"][1]:
        kind = "shifted"  # no room to magnify the region inside the crop: pan it instead
    if side >= size:
        kind = "view"  # the region fills the crop: only a perspective warp moves it
    t = unaligned_transform(rng, kind, size, side, ry0, rx0, opts)
    if kind != "view" and config.reference_warp > 0:
        t = unaligned_transform(rng, "view", size, side, ry0, rx0, opts) @ t
    # the canvas: the crop frame with `pad` mirrored pixels on every side, wherever the image ends
    pad = int(math.ceil((config.reference_shift_fraction + config.reference_warp) * size)) + 2
    arr = np.asarray(img)
    q = size + pad
    padded = np.pad(arr, ((q, q), (q, q), (0, 0)), mode="symmetric")
    canvas = padded[cy0 - pad + q : cy0 + size + pad + q, cx0 - pad + q : cx0 + size + pad + q]
    to_canvas = np.array([[1.0, 0, pad], [0, 1.0, pad], [0, 0, 1]]) @ np.linalg.inv(t)
    to_canvas /= to_canvas[2, 2]
    ref = Image.fromarray(canvas).transform((size, size), Image.PERSPECTIVE, to_canvas.ravel()[:8], Image.BICUBIC)
    full = t @ np.array([[1.0, 0, -cx0], [0, 1.0, -cy0], [0, 0, 1]])  # target pixels -> reference pixels
    corners = _project(full, np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]], float))
    lo, hi = np.floor(corners.min(0) + 1e-6), np.ceil(corners.max(0) - 1e-6)
    ref_box = [int(np.clip(v, 0, size)) for v in (lo[0], lo[1], hi[0], hi[1])]
    return {
        "reference": to_png(ref),
        "ref_geometry": kind,
        "ref_transform": [round(float(v), 6) for v in (full / full[2, 2]).ravel()],
        "ref_box": ref_box,
    }


def record_id(source_id: str, k: int) -> str:
    """A file-name-safe id, unique per source image and region."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source_id.rsplit(".", 1)[0])[-40:]
    return f"{stem}-{zlib.crc32(source_id.encode()):08x}-{k}"


def _regions_of(row: dict, img: Image.Image, rng, config) -> list[list[int]]:
    if row["region_mask"]:
        m = np.asarray(from_png(row["region_mask"], mask=True)) >= 128
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        return [[int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]]
    if row["region_box"]:
        import json

        return [json.loads(row["region_box"])]
    if config.region_detector:
        return detected_regions(img, rng, config.regions_per_image, config.region_detector)
    return auto_regions(img, rng, config.regions_per_image, config.region_fraction, config.min_detail)


def _region_batch(batch: dict, *, config) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = {k: [] for k in FEATURES}

    def add(r):
        for k in FEATURES:
            out[k].append(r[k])

    for row in rows:
        sid = row["source_id"]
        rng = record_rng(config.seed, "region", sid)
        img = from_png(row["image"])
        empty = dict(EMPTY, source_id=sid)
        boxes = _regions_of(row, img, rng, config)
        if not boxes:
            how = f"region_detector {config.region_detector}" if config.region_detector else "detail energy"
            reason = "no_detection" if config.region_detector else "flat"
            add(
                dropped(
                    reason, f"source image {sid!r}: no region found by {how} (min_detail {config.min_detail})", empty
                )
            )
            continue
        for k, box in enumerate(boxes):
            mask = np.zeros((img.size[1], img.size[0]), np.uint8)
            if row["region_mask"]:
                mask = np.where(np.asarray(from_png(row["region_mask"], mask=True)) >= 128, 255, 0).astype(np.uint8)
            else:
                mask[box[1] : box[3], box[0] : box[2]] = 255
            rec = dict(empty, id=record_id(sid, k), prompt=config.prompt, target=row["image"], region=box)
            rec["mask"] = to_png(Image.fromarray(mask, "L"))
            if row["reference"]:
                rec.update(reference=row["reference"], ref_geometry="given")
            else:
                try:
                    rec.update(warped_reference(img, box, rng, config))
                except DataError as e:
                    add(dropped("bad_region", f"source image {sid!r}: {e}", empty))
                    continue
            add(kept(rec))
    return out


def region_and_reference(ds: datasets.Dataset, config, ctx: StageContext) -> datasets.Dataset:
    """Stage 2 (module docstring): one row per (image, region), ``_drop`` set for images with no region."""
    return ctx.map(
        ds,
        _region_batch,
        step="regions, references",
        num_proc=config.num_proc,
        batched=True,
        batch_size=8,
        fn_kwargs={"config": config},
        remove_columns=ds.column_names,
        features=FEATURES,
    )
