"""A synthetic preference set for the refinement task, where the preferred image is objectively better.

From each synthetic triplet (:func:`refiner_rl.data.synthetic.synthetic_records`: target, degraded draft,
reference holding the true detail at the same place, mask) two candidates are made; outside the mask both equal the
draft. Inside it:

- ``detail_fidelity``, ``kind="detail"``: ``draft + alpha * (target - draft)`` for two different ``alpha`` in
  {0, 1/2, 1}; the larger ``alpha`` (more of the reference's detail) is preferred.
- ``detail_fidelity``, ``kind="noise"``: ``target + a * (wrong - target)`` for two different ``a`` in {0, 1/2, 1},
  where ``wrong`` is the target plus Gaussian noise of std 0.4; the smaller ``a`` is preferred. Its squared distance
  to the reference inside the mask is ``a^2 |wrong - target|^2`` (before clipping to [0, 1]): smaller.
- ``detail_fidelity``, ``kind="swap"`` or ``"shift"``: twins, where only the reference tells which image is right.
  Inside the mask one candidate holds the true detail, the other another record's detail (``swap``) or the true
  detail shifted by a few pixels, wrapping around the masked square (``shift``). The same two images (same order)
  make two records: one with the record's reference (the true detail wins), one with that reference holding the
  other candidate's content in the region (the other wins). The source (draft) is the target outside the mask and
  the two contents' mean colour, flat, inside it. So without the reference the two records are the same question
  with opposite answers: a judge that sees no reference is right on exactly one of each twin (at most).
- ``detail_fidelity``, ``kind="degrade"``: the target with one of the data build's degradations inside the mask
  (:mod:`refiner_rl.data.build.degrade`: ``blur``, ``jpeg``, ``downsample``, or all three in a row, ``mix``) at a
  mild and a strong setting (:data:`DEGRADE_LEVELS`); the milder one is preferred. The source is the draft.
- ``draft_consistency``: the target's detail inside the mask, and outside it the draft shifted by
  ``beta * offset`` (one random RGB offset of the record, ``|offset| = 0.5``) for two different ``beta``.
  Preferred: the smaller ``beta`` (closer to the draft).

The preferred image is ``image_a`` in every other pair of a dimension (a balanced order; twins: in one of each
twin). ``kind`` may join kinds with ``+`` (``swap+shift+degrade``): records cycle over them, twins together; each
record names its ``kind``. ``region`` is the side of the masked square over the image side.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from refiner_rl.data.synthetic import synthetic_records
from refiner_rl.onereward.pairs import PAIRS_FILE

LEVELS = (0.0, 0.5, 1.0)
SYNTHETIC_DIMENSIONS = ("detail_fidelity", "draft_consistency")


KINDS = ("detail", "shift", "noise", "swap", "degrade")
TWIN_KINDS = ("swap", "shift")
# the data build's degradations at a mild and a strong setting, each drawn per pair: (mild, strong) step lists
DEGRADE_LEVELS = {
    "blur": ([("blur", "radius", 0.5, 0.9)], [("blur", "radius", 1.4, 2.2)]),
    "jpeg": ([("jpeg", "quality", 60, 90)], [("jpeg", "quality", 5, 15)]),
    "downsample": ([("downsample", "factor", 2, 2)], [("downsample", "factor", 4, 6)]),
    "mix": (
        [("blur", "radius", 0.3, 0.5), ("downsample", "factor", 2, 2), ("jpeg", "quality", 70, 90)],
        [("blur", "radius", 1.0, 1.5), ("downsample", "factor", 3, 4), ("jpeg", "quality", 10, 25)],
    ),
}


def synthetic_pairs(
    n: int, seed: int = 0, size: int = 32, dimensions=SYNTHETIC_DIMENSIONS, kind: str = "detail", region: float = 0.5
):
    """``n`` in-memory records (PIL images), alternating over ``dimensions``; the same seed gives the same set."""
    from refiner_rl.errors import ConfigError

    if not dimensions or any(d not in SYNTHETIC_DIMENSIONS for d in dimensions):
        raise ConfigError(
            f"synthetic pairs: dimensions {list(dimensions)}: use any of {', '.join(SYNTHETIC_DIMENSIONS)}"
        )
    kinds = kind.split("+")
    if any(k not in KINDS for k in kinds) or ("detail" in kinds and len(kinds) > 1):
        raise ConfigError(
            f"synthetic pairs: kind {kind!r}: use one of {', '.join(KINDS)}, or several of them except detail "
            "joined with + (e.g. swap+shift+degrade)"
        )
    rng = np.random.default_rng(seed + 7919)
    records = synthetic_records(n + 1, seed=seed, size=size, region=region)  # one more: swap's other detail
    out, i = [], 0
    while len(out) < n:
        rec, dim = records[i], dimensions[i % len(dimensions)]
        k = kinds[(i // len(dimensions)) % len(kinds)]
        base = {"task": "refine", "dimension": dim, "prompt": rec["prompt"], "mask": rec["mask"]}
        if dim == "detail_fidelity" and k in TWIN_KINDS:
            for twin in _twins(k, rec, records[(i + 1) % len(records)], rng):
                out.append({"id": f"pair-{seed}-{len(out)}", "kind": k, **base, **twin})
            i += 1
            continue
        target, draft = (np.asarray(rec[key], np.float32) / 255.0 for key in ("target", "draft"))
        mask = (np.asarray(rec["mask"], np.float32) / 255.0)[..., None]
        lo, hi = sorted(rng.choice(LEVELS, size=2, replace=False))
        if dim == "detail_fidelity" and k == "detail":
            better, worse = (draft + a * mask * (target - draft) for a in (hi, lo))
        elif dim == "detail_fidelity" and k == "degrade":
            better, worse = _degraded_pair(rec, rng)
        elif dim == "detail_fidelity":
            wrong = target + 0.4 * rng.normal(size=target.shape)
            better, worse = (draft + mask * (target + a * (wrong - target) - draft) for a in (lo, hi))
        else:
            offset = rng.normal(size=3)
            offset = 0.5 * offset / np.linalg.norm(offset)
            inside = mask * target
            better, worse = (inside + (1 - mask) * (draft + b * offset) for b in (lo, hi))
        a_wins = (i // len(dimensions)) % 2 == 0  # the preferred image is A in half the pairs of each dimension
        first, second = (better, worse) if a_wins else (worse, better)
        out.append(
            {
                "id": f"pair-{seed}-{len(out)}",
                "kind": k,
                **base,
                "preferred": "a" if a_wins else "b",
                "image_a": _pil(first),
                "image_b": _pil(second),
                "reference": rec["reference"],
                "source": rec["draft"],
            }
        )
        i += 1
    return out[:n]


def _twins(kind: str, rec: dict, other: dict, rng: np.random.Generator) -> list[dict]:
    """The two records of one twin (module docstring): the same images A and B, each one preferred once."""
    target, reference = (np.asarray(rec[key], np.float32) / 255.0 for key in ("target", "reference"))
    inside = np.asarray(rec["mask"]) >= 128
    ys, xs = np.nonzero(inside)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    true = target[box]
    if kind == "swap":
        o_inside = np.asarray(other["mask"]) >= 128
        oy, ox = np.nonzero(o_inside)
        o_target = np.asarray(other["target"], np.float32) / 255.0
        wrong = o_target[oy.min() : oy.max() + 1, ox.min() : ox.max() + 1]
    else:
        wrong = _shifted(true, rng)
    right, other_img = target.copy(), target.copy()
    other_img[box] = wrong
    right_ref, other_ref = reference.copy(), reference.copy()
    other_ref[box] = wrong
    source = target.copy()
    source[box] = 0.5 * (true.mean((0, 1)) + wrong.mean((0, 1)))  # flat, and the same for either content
    right_first = bool(rng.random() < 0.5)
    first, second = (right, other_img) if right_first else (other_img, right)
    images = {"image_a": _pil(first), "image_b": _pil(second), "source": _pil(source)}
    return [
        {**images, "reference": _pil(right_ref), "preferred": "a" if right_first else "b"},
        {**images, "reference": _pil(other_ref), "preferred": "b" if right_first else "a"},
    ]


def _shifted(detail: np.ndarray, rng: np.random.Generator, min_change: float = 0.1) -> np.ndarray:
    """The detail rolled by a few pixels (up to a quarter of its side, wrapping), drawn until its mean absolute
    change is at least ``min_change`` (a stripe rolled along itself or by its period would not change)."""
    side = min(detail.shape[:2])
    best, change = detail, -1.0
    for _ in range(20):
        d = rng.integers(-max(1, side // 4), max(1, side // 4) + 1, size=2)
        moved = np.roll(detail, tuple(int(v) for v in d), axis=(0, 1))
        c = float(np.abs(moved - detail).mean())
        if c > change:
            best, change = moved, c
        if c >= min_change:
            break
    return best


def _degraded_pair(rec: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mild, strong): the target with one of :data:`DEGRADE_LEVELS` inside the mask, through the data build's own
    operators (:func:`refiner_rl.data.build.degrade.apply_image_op` and ``paste``)."""
    from refiner_rl.data.build.degrade import apply_image_op, paste

    name = list(DEGRADE_LEVELS)[int(rng.integers(len(DEGRADE_LEVELS)))]
    target, mask = rec["target"].convert("RGB"), rec["mask"].convert("L")
    out = []
    for steps in DEGRADE_LEVELS[name]:
        img = target
        for op, param, lo, hi in steps:
            value = int(rng.integers(lo, hi + 1)) if isinstance(lo, int) else float(rng.uniform(lo, hi))
            img = paste(apply_image_op(img, {"op": op, param: value}, rng), img, mask)
        out.append(np.asarray(img, np.float32) / 255.0)
    return out[0], out[1]


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8))


def write_synthetic_pairs(folder: str, n: int, seed: int = 0, size: int = 32, **kwargs) -> str:
    """Write :func:`synthetic_pairs` as PNG files plus ``pairs.jsonl`` (paths relative to ``folder``)."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for rec in synthetic_pairs(n, seed, size, **kwargs):
        row = {}
        for key, value in rec.items():
            if isinstance(value, Image.Image):
                name = f"{rec['id']}_{key}.png"
                value.save(os.path.join(folder, name))
                value = name
            row[key] = value
        lines.append(json.dumps(row))
    path = os.path.join(folder, PAIRS_FILE)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
