"""Synthetic triplets with real fine detail, for the embedded default and the tests.

Each record: a *target* image (a coarse background pattern with a fine-detail region: glyphs, fine
stripes, fine checkers or a block texture; with ``textures="extended"`` also fine value noise and pen
strokes), a *draft* (the target with the region degraded by a 4x average-pool round trip, which is what VAE
compression does to fine detail; optionally blurred and/or JPEG-compressed too), a *reference* holding the
region's true detail (an ``aligned`` one on a different background; the others are views of the target's own scene,
whose pattern continues past the frame) and the region's *mask*.

Where the detail sits in the reference is the record's *geometry* (``geometry=``, one name or a mix):

- ``aligned`` (default): at the region's own place (or jittered by up to ``ref_shift`` pixels);
- ``shifted``: the reference view is panned by up to ``shift_fraction`` of the image, same scale, in multiples of
  ``shift_step`` pixels (1 by default);
- ``zoomed``: the reference is a crop around the region rescaled by a factor drawn from ``zoom_range`` (capped so
  the magnified region fits the image), sampled nearest so the detail stays sharp;
- ``view``: another view: a mild perspective warp (each corner moved by up to ``warp`` of the image side) and a
  per-channel colour change ``ref = clip(gain * scene + bias)``, gain in ``1 +- color_jitter``, bias in
  ``+- color_jitter / 2``. A region at the border may lose a few pixels out of the view.

Every record carries what was used: ``ref_geometry``; ``ref_transform``, the 3x3 matrix (9 floats, row-major)
taking a target point ``(x, y, 1)`` to reference coordinates ``(x', y', w)`` (divide by ``w``; pixel ``k`` spans
``[k, k+1)``); ``ref_box`` ``[x0, y0, x1, y1]``, the reference pixels where the region's detail appears (clipped
to the image); and ``ref_color`` ``[gain_r, gain_g, gain_b, bias_r, bias_g, bias_b]`` (bias in [0, 1] units).
The default reference lines up with the target; the embedded default trains on shifted and zoomed ones
(docs/algorithms.md#unaligned-references-and-region-focus).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from refiner_rl.errors import ConfigError

PROMPT = "Restore the detail in the marked region using the reference image."
GLYPHS = "ABCDEFGHKMNPRSTUVWXYZ0123456789#@%&"
GEOMETRIES = ("aligned", "shifted", "zoomed", "view")
DEGRADATIONS = ("pool", "blur", "jpeg")
TEXTURES = {"classic": 4, "extended": 6}  # number of fine-detail kinds drawn from


def _colors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3)).astype(np.float32)


def _coarse_pattern(rng: np.random.Generator, size: int, pad: int = 0) -> np.ndarray:
    """A two-colour stripe, diagonal or checker scene of ``size + 2 pad`` pixels; the pattern continues into the
    ``pad`` border, so the centre ``size`` x ``size`` is the same scene for any ``pad``."""
    yy, xx = np.mgrid[-pad : size + pad, -pad : size + pad]
    kind = rng.integers(3)
    period = int(rng.integers(8, 17))
    if kind == 0:
        on = (yy // (period // 2)) % 2 == 0
    elif kind == 1:
        on = ((yy + xx) // (period // 2)) % 2 == 0
    else:
        on = ((yy // period) + (xx // period)) % 2 == 0
    c = _colors(rng, 2)
    return np.where(on[..., None], c[0], c[1])


def _fine_detail(rng: np.random.Generator, h: int, w: int, kinds: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    kind = int(rng.integers(kinds))
    c = _colors(rng, 2)
    if kind == 0:  # fine stripes, period 2-3
        p = int(rng.integers(2, 4))
        on = (xx if rng.random() < 0.5 else yy) % p == 0
    elif kind == 1:  # fine checkers, cell 1-2
        s = int(rng.integers(1, 3))
        on = ((yy // s) + (xx // s)) % 2 == 0
    elif kind == 2:  # random block texture
        s = int(rng.integers(1, 3))
        blocks = rng.random(((h + s - 1) // s, (w + s - 1) // s)) < 0.5
        on = np.kron(blocks, np.ones((s, s), dtype=bool))[:h, :w]
    elif kind == 3:  # glyphs / text
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        text = "".join(rng.choice(list(GLYPHS), size=8))
        for row in range(0, h, 8):
            draw.text((int(rng.integers(-3, 1)), row - 1), text[row % 4 :] + text, fill=255, font=font)
        on = np.asarray(img) > 96
    elif kind == 4:  # fine value noise: two octaves (cells of 1 and 2 pixels), many grey levels between c0 and c1
        fine = rng.random((h, w))
        coarse = np.kron(rng.random(((h + 1) // 2, (w + 1) // 2)), np.ones((2, 2)))[:h, :w]
        t = (0.6 * fine + 0.4 * coarse)[..., None]
        return c[0] * t + c[1] * (1 - t)
    else:  # pen strokes: short 1-pixel lines at random angles, like handwriting
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(max(3, h * w // 24)):
            x, y = rng.random(2) * (w, h)
            a, length = rng.random() * math.pi, 2 + rng.random() * 4
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=255, width=1)
        on = np.asarray(img) > 96
    return np.where(on[..., None], c[0], c[1])


def _degrade(region: np.ndarray, factor: int = 4, steps: Sequence[str] = ("pool",)) -> np.ndarray:
    h, w, _ = region.shape
    img = Image.fromarray(region.astype(np.uint8))
    if "pool" in steps:
        small = img.resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
        img = small.resize((w, h), Image.BILINEAR)
    if "blur" in steps:
        img = img.filter(ImageFilter.GaussianBlur(radius=1.0))
    if "jpeg" in steps:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=30)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img).astype(np.float32)


def parse_geometry(geometry: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """Probabilities of each reference geometry from a name (``"zoomed"``), a list or comma list of names (an even
    mix: ``"aligned,zoomed"``), or weights (``{"aligned": 1, "view": 3}`` or ``"aligned=1,view=3"``)."""
    if isinstance(geometry, str):
        parts = [p.strip() for p in geometry.split(",") if p.strip()]
        if all("=" in p for p in parts):
            items = []
            for p in parts:
                name, _, value = p.partition("=")
                try:
                    items.append((name.strip(), float(value)))
                except ValueError:
                    raise ConfigError(
                        f"synthetic geometry: weight {value!r} of {name.strip()!r} is not a number"
                    ) from None
        else:
            items = [(p, 1.0) for p in parts]
    elif isinstance(geometry, Mapping):
        items = [(str(k), float(v)) for k, v in geometry.items()]
    else:
        items = [(str(g), 1.0) for g in geometry]
    unknown = [name for name, _ in items if name not in GEOMETRIES]
    if not items or unknown:
        raise ConfigError(
            f"synthetic geometry {geometry!r}: unknown or missing geometry {unknown or ''}; use one of "
            f"{', '.join(GEOMETRIES)}, a comma list of them, or name=weight pairs"
        )
    weights: dict[str, float] = {}
    for name, w in items:
        if w < 0 or not math.isfinite(w):
            raise ConfigError(f"synthetic geometry: weight of {name!r} must be a finite number >= 0, got {w}")
        weights[name] = weights.get(name, 0.0) + w
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"synthetic geometry {geometry!r}: the weights sum to 0")
    return {k: v / total for k, v in weights.items() if v > 0}


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 matrix taking the four points ``src`` [4, 2] to ``dst`` [4, 2] (direct linear solve, h33 = 1)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    return np.append(np.linalg.solve(np.array(a, float), np.array(b, float)), 1.0).reshape(3, 3)


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ m.T
    return p[:, :2] / p[:, 2:]


def _render(canvas: np.ndarray, pad: int, t: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` reference whose pixel centres map through ``inv(t)`` to target coordinates, sampled
    nearest from ``canvas`` (the target frame with ``pad`` pixels on every side), so fine detail stays sharp."""
    jj, ii = np.mgrid[0:size, 0:size]
    centres = np.stack([ii.ravel() + 0.5, jj.ravel() + 0.5], axis=1)
    src = _apply(np.linalg.inv(t), centres) + pad
    hi = canvas.shape[0] - 1
    x, y = (np.clip(np.floor(src[:, k]).astype(int), 0, hi) for k in (0, 1))
    return canvas[y, x].reshape(size, size, 3)


def unaligned_transform(rng, kind: str, size: int, side: int, y0: int, x0: int, opts: dict) -> np.ndarray:
    """The target-to-reference matrix of one ``shifted``, ``zoomed`` or ``view`` record."""
    if kind == "shifted":  # a pan by a multiple of shift_step keeping the whole region in view; never aligned
        m, q = max(1, int(round(opts["shift_fraction"] * size))), opts["shift_step"]
        lo = [-((min(m, p)) // q) for p in (x0, y0)]
        hi = [min(m, size - side - p) // q for p in (x0, y0)]
        if all(lo[k] == 0 == hi[k] for k in (0, 1)):
            lo, hi = [max(-m, -p) for p in (x0, y0)], [min(m, size - side - p) for p in (x0, y0)]
            q = 1  # no room for a whole step: pan by pixels
        dx = dy = 0
        while dx == 0 and dy == 0:
            dx, dy = (q * int(rng.integers(lo[k], hi[k] + 1)) for k in (0, 1))
        return np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1]])
    if kind == "zoomed":  # window of side size/z inside the image, containing the region; region lands at (ox, oy)
        zmin, zmax = opts["zoom_range"]
        z = float(rng.uniform(zmin, min(zmax, size / side)))
        o = []
        for p in (x0, y0):
            lo, hi = max(0.0, size - z * (size - p)), min(size - side * z, z * p)
            o.append(float(rng.uniform(lo, hi)) if hi > lo else lo)
        return np.array([[z, 0, o[0] - z * x0], [0, z, o[1] - z * y0], [0, 0, 1]])
    d = opts["warp"] * size  # view: the reference's corners come from the target frame's corners moved by <= d
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], float)
    return _homography(corners + rng.uniform(-d, d, size=(4, 2)), corners)


def make_triplet(
    rng: np.random.Generator,
    size: int = 32,
    region: float = 0.5,
    ref_shift: int = 0,
    *,
    geometry: str | Sequence[str] | Mapping[str, float] = "aligned",
    shift_fraction: float = 0.25,
    shift_step: int = 1,
    zoom_range: tuple[float, float] = (1.5, 2.0),
    warp: float = 0.08,
    color_jitter: float = 0.2,
    degrade: str = "pool",
    textures: str = "classic",
    num_references: int = 1,
    detail_reference: int = -1,
) -> dict:
    """One synthetic record with PIL images (``target``, ``draft``, ``reference``, ``mask``) and the reference's
    geometry (module docstring). ``ref_shift`` jitters the ``aligned`` geometry only.

    With ``num_references > 1`` the ``reference`` is a list of that many images: the one at ``detail_reference``
    (default the last) is the reference above, the others distractors: other scenes with other fine detail drawn
    in the same geometry, so only that one holds the region's detail (``ref_index`` names it; the ``ref_*``
    geometry fields describe it). Drawn after everything else, so the first record's own images do not change."""
    opts = _check_options(
        size, region, geometry, shift_fraction, shift_step, zoom_range, warp, color_jitter, degrade, textures
    )
    if int(num_references) < 1 or not -int(num_references) <= int(detail_reference) < int(num_references):
        raise ConfigError(
            f"synthetic num_references must be >= 1 and detail_reference an index into them, got {num_references} "
            f"and {detail_reference}"
        )
    probs = opts["geometry"]
    kind = next(iter(probs)) if len(probs) == 1 else str(rng.choice(list(probs), p=list(probs.values())))
    side = max(4, int(round(size * region)))
    y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    detail = _fine_detail(rng, side, side, TEXTURES[textures])
    # unaligned references are other views of the target's own scene, which continues past the frame by ``pad``
    pad = 0 if kind == "aligned" else int(math.ceil(max(opts["shift_fraction"], opts["warp"]) * size)) + 1
    canvas = _coarse_pattern(rng, size, pad)
    canvas[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side] = detail
    target = canvas[pad : pad + size, pad : pad + size].copy()
    draft = target.copy()
    draft[y0 : y0 + side, x0 : x0 + side] = _degrade(detail, steps=opts["degrade"])
    color = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    if kind == "aligned":
        reference = _coarse_pattern(rng, size)
        dy, dx = (int(v) for v in rng.integers(-ref_shift, ref_shift + 1, size=2)) if ref_shift else (0, 0)
        ry, rx = min(max(0, y0 + dy), size - side), min(max(0, x0 + dx), size - side)
        reference[ry : ry + side, rx : rx + side] = detail
        t = np.array([[1.0, 0, rx - x0], [0, 1.0, ry - y0], [0, 0, 1]])
    else:
        t = unaligned_transform(rng, kind, size, side, y0, x0, opts)
        reference = _render(canvas, pad, t, size)
        if kind == "view":
            j = opts["color_jitter"]
            color = [float(v) for v in np.concatenate([rng.uniform(1 - j, 1 + j, 3), rng.uniform(-j / 2, j / 2, 3)])]
            reference = np.round(np.clip(reference * color[:3] + np.asarray(color[3:]) * 255.0, 0, 255))
    corners = _apply(t, np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float))
    lo, hi = np.floor(corners.min(0) + 1e-6), np.ceil(corners.max(0) - 1e-6)
    box = [int(np.clip(v, 0, size)) for v in (lo[0], lo[1], hi[0], hi[1])]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0 : y0 + side, x0 : x0 + side] = 255

    def im(a):
        return Image.fromarray(a.astype(np.uint8))

    out = {
        "prompt": PROMPT,
        "target": im(target),
        "draft": im(draft),
        "reference": im(reference),
        "mask": Image.fromarray(mask, mode="L"),
        "ref_geometry": kind,
        "ref_box": box,
        "ref_transform": [round(float(v), 6) for v in t.ravel()],
        "ref_color": [round(v, 6) for v in color],
    }
    if num_references > 1:
        k = int(detail_reference) % int(num_references)
        distractors = [_distractor(rng, size, pad, t, kind, side, y0, x0, textures) for _ in range(num_references - 1)]
        out["reference"] = [im(d) for d in distractors[:k]] + [out["reference"]] + [im(d) for d in distractors[k:]]
        out["ref_index"] = k
    return out


def _distractor(rng, size: int, pad: int, t: np.ndarray, kind: str, side: int, y0: int, x0: int, textures: str):
    """A reference like the true one, drawn through the same target-to-reference matrix ``t``, of another scene
    whose region holds other fine detail."""
    canvas = _coarse_pattern(rng, size, pad)
    canvas[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side] = _fine_detail(rng, side, side, TEXTURES[textures])
    if kind == "aligned":
        ry, rx = int(round(y0 + t[1, 2])), int(round(x0 + t[0, 2]))
        reference = _coarse_pattern(rng, size)
        reference[ry : ry + side, rx : rx + side] = canvas[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
        return reference
    return _render(canvas, pad, t, size)


def _check_options(
    size, region, geometry, shift_fraction, shift_step, zoom_range, warp, color_jitter, degrade, textures
) -> dict:
    probs = parse_geometry(geometry)
    side = max(4, int(round(size * region)))
    if side > size:
        raise ConfigError(f"synthetic `region` {region} gives a {side}-pixel region in a {size}-pixel image; use <= 1")
    if "shifted" in probs and (side >= size or shift_fraction <= 0):
        raise ConfigError(
            f"synthetic geometry `shifted` needs room to move the region: region {region} of size {size} with "
            f"shift_fraction {shift_fraction}; use a region < 1 and a shift_fraction > 0"
        )
    if int(shift_step) < 1:
        raise ConfigError(f"synthetic shift_step must be a whole number of pixels >= 1, got {shift_step}")
    zmin, zmax = (float(v) for v in zoom_range)
    if "zoomed" in probs and not (1.0 <= zmin <= zmax and zmin * side <= size):
        raise ConfigError(
            f"synthetic zoom_range {tuple(zoom_range)} must satisfy 1 <= min <= max and min * region <= 1 (the "
            f"zoomed region must fit the reference); region is {region}, so use a min zoom <= {size / side:.2f}"
        )
    if not (0 <= warp < 0.25) or not (0 <= color_jitter < 1):
        raise ConfigError(f"synthetic warp must be in [0, 0.25) and color_jitter in [0, 1), got {warp}, {color_jitter}")
    steps = [s.strip() for s in degrade.split("+") if s.strip()]
    if not steps or any(s not in DEGRADATIONS for s in steps):
        raise ConfigError(f"synthetic degrade {degrade!r}: use steps of {', '.join(DEGRADATIONS)} joined by '+'")
    if textures not in TEXTURES:
        raise ConfigError(f"synthetic textures {textures!r}: use one of {', '.join(TEXTURES)}")
    return {
        "geometry": probs,
        "shift_fraction": shift_fraction,
        "shift_step": int(shift_step),
        "zoom_range": (zmin, zmax),
        "warp": warp,
        "color_jitter": color_jitter,
        "degrade": steps,
    }


def synthetic_records(
    n: int, seed: int = 0, size: int = 32, region: float = 0.5, ref_shift: int = 0, **geometry_options
) -> list[dict]:
    """``n`` in-memory records; the same seed and options give the same records. ``geometry_options`` are the
    keyword options of :func:`make_triplet` (``geometry``, ``shift_fraction``, ``zoom_range``, ``warp``,
    ``color_jitter``, ``degrade``, ``textures``, ``num_references``, ``detail_reference``)."""
    rng = np.random.default_rng(seed)
    return [
        dict(make_triplet(rng, size, region, ref_shift, **geometry_options), id=f"syn-{seed}-{i}") for i in range(n)
    ]


def write_synthetic_dataset(folder: str, n: int, seed: int = 0, size: int = 32, **kwargs) -> str:
    """Write ``n`` synthetic records with :func:`write_records`; returns the path of ``records.jsonl``."""
    return write_records(folder, synthetic_records(n, seed, size, **kwargs))


def write_records(folder: str, records: Sequence[dict]) -> str:
    """Write records holding PIL images as PNG files (``<id>_<field>.png``; a list of images, e.g. several
    references, as ``<id>_<field>_<k>.png`` and a list of paths) plus ``records.jsonl`` with their paths relative to
    ``folder``; other fields (prompt, id, the ``ref_*`` geometry) are written as they are. Returns the path of
    ``records.jsonl``."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for rec in records:
        row = {}
        for key, value in rec.items():
            if isinstance(value, Image.Image):
                row[key] = f"{rec['id']}_{key}.png"
                value.save(os.path.join(folder, row[key]))
            elif isinstance(value, list) and value and all(isinstance(v, Image.Image) for v in value):
                row[key] = [f"{rec['id']}_{key}_{j}.png" for j in range(len(value))]
                for name, image in zip(row[key], value):
                    image.save(os.path.join(folder, name))
            else:
                row[key] = value
        lines.append(json.dumps(row))
    path = os.path.join(folder, "records.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# Instructions of the synthetic mask-guided tasks (removal's is the fixed REMOVAL_PROMPT of the records)
FILL_PROMPT = "Fill the marked region with the fine detail that belongs there."
EXTEND_PROMPT = "Extend the image past its borders."
MASK_TASK_MIX = {"fill": 0.5, "extend": 0.25, "removal": 0.25}  # OneReward's mix


def mask_task_records(
    n: int, seed: int = 0, size: int = 32, region: float = 0.5, tasks: Mapping[str, float] | None = None, **options
) -> list[dict]:
    """``n`` mask-guided task records (FLUX.1-Fill's data: ``{task, image, mask?, prompt, target, margin?}``) drawn from
    the synthetic scenes, the tasks in the proportions of ``tasks`` (default :data:`MASK_TASK_MIX`), each task's
    records spread through the list:

    - ``fill``: the target with its detail region greyed out, the region's mask and :data:`FILL_PROMPT`;
    - ``extend``: the target with a border band a quarter of each side wide greyed out (``margin: 0.25``; the records
      carry no mask, it is built from the margin) and :data:`EXTEND_PROMPT`;
    - ``removal``: the target with a solid disc of one random colour drawn over the detail region, whose mask is the
      region; removing it restores the target.

    ``options`` are :func:`make_triplet`'s. The same seed and options give the same records."""
    from refiner_rl.data.validation import MASK_TASKS

    mix = dict(MASK_TASK_MIX if tasks is None else tasks)
    unknown = [t for t in mix if t not in MASK_TASKS]
    if unknown or not mix or any(not p > 0 for p in mix.values()):
        raise ConfigError(f"synthetic tasks {mix}: give tasks of {', '.join(MASK_TASKS)} with weights > 0")
    total = sum(mix.values())
    counts = {t: int(n * p / total) for t, p in mix.items()}
    for t in sorted(mix, key=lambda t: n * mix[t] / total - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1
    rng = np.random.default_rng(seed)
    order = rng.permutation([t for t in mix for _ in range(counts[t])]).tolist()
    out = []
    for i, task in enumerate(order):
        rec = make_triplet(rng, size, region, **options)
        target = np.asarray(rec["target"]).astype(np.float64)
        mask = np.asarray(rec["mask"]) >= 128
        row = {"id": f"task-{seed}-{i}", "task": task, "target": rec["target"]}
        image = target.copy()
        if task == "fill":
            image[mask] = 128.0
            row.update(mask=rec["mask"], prompt=FILL_PROMPT)
        elif task == "extend":
            band = max(1, round(0.25 * size))
            image[:band], image[-band:], image[:, :band], image[:, -band:] = 128.0, 128.0, 128.0, 128.0
            row.update(margin=0.25, prompt=EXTEND_PROMPT)
        else:
            ys, xs = np.nonzero(mask)
            cy, cx, r = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2, (ys.max() - ys.min() + 1) / 2
            yy, xx = np.mgrid[:size, :size]
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r * 0.9) ** 2
            image[disc] = rng.integers(0, 256, 3)
            row.update(mask=rec["mask"])
        row["image"] = Image.fromarray(image.astype(np.uint8))
        out.append(row)
    return out
