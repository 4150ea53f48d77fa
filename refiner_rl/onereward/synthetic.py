"""A synthetic preference set for the refinement task, where the preferred image is objectively better.

From each synthetic triplet (:func:`refiner_rl.data.synthetic.synthetic_records`: target, degraded draft,
reference holding the true detail at the same place, mask) two candidates are made; outside the mask both equal the
draft. Inside it:

- ``detail_fidelity``, ``kind="detail"``: ``draft + alpha * (target - draft)`` for two different ``alpha`` in
  {0, 1/2, 1}; the larger ``alpha`` (more of the reference's detail) is preferred.
- ``detail_fidelity``, other kinds: ``target + a * (wrong - target)`` for two different ``a`` in {0, 1/2, 1}, where
  ``wrong`` is the target plus Gaussian noise of std 0.4 (``noise``), the target shifted by one RGB offset of norm 0.6
  (``shift``), or the target's colours inverted (``swap``); the smaller ``a`` is preferred. Its squared distance to
  the reference inside the mask is ``a^2 |wrong - target|^2`` (before clipping to [0, 1]): smaller.
- ``draft_consistency``: the target's detail inside the mask, and outside it the draft shifted by
  ``beta * offset`` (one random RGB offset of the record, ``|offset| = 0.5``) for two different ``beta``.
  Preferred: the smaller ``beta`` (closer to the draft).

The preferred image is ``image_a`` in every other pair of a dimension (a balanced order). ``source`` is the draft.
``region`` is the side of the masked square over the image side.
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


KINDS = ("detail", "shift", "noise", "swap")


def synthetic_pairs(
    n: int, seed: int = 0, size: int = 32, dimensions=SYNTHETIC_DIMENSIONS, kind: str = "detail", region: float = 0.5
):
    """``n`` in-memory records (PIL images), alternating over ``dimensions``; the same seed gives the same set."""
    from refiner_rl.errors import ConfigError

    if not dimensions or any(d not in SYNTHETIC_DIMENSIONS for d in dimensions):
        raise ConfigError(
            f"synthetic pairs: dimensions {list(dimensions)}: use any of {', '.join(SYNTHETIC_DIMENSIONS)}"
        )
    if kind not in KINDS:
        raise ConfigError(f"synthetic pairs: kind {kind!r}: use one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed + 7919)
    out = []
    for i, rec in enumerate(synthetic_records(n, seed=seed, size=size, region=region)):
        target, draft = (np.asarray(rec[k], np.float32) / 255.0 for k in ("target", "draft"))
        mask = (np.asarray(rec["mask"], np.float32) / 255.0)[..., None]
        dim = dimensions[i % len(dimensions)]
        lo, hi = sorted(rng.choice(LEVELS, size=2, replace=False))
        if dim == "detail_fidelity" and kind == "detail":
            better, worse = (draft + a * mask * (target - draft) for a in (hi, lo))
        elif dim == "detail_fidelity":
            wrong = _wrong_content(kind, target, rng)
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
                "id": f"pair-{seed}-{i}",
                "task": "refine",
                "dimension": dim,
                "preferred": "a" if a_wins else "b",
                "prompt": rec["prompt"],
                "image_a": _pil(first),
                "image_b": _pil(second),
                "reference": rec["reference"],
                "source": rec["draft"],
                "mask": rec["mask"],
            }
        )
    return out


def _wrong_content(kind: str, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a worse candidate drifts to inside the mask (module docstring)."""
    if kind == "shift":
        offset = rng.normal(size=3)
        return target + 0.6 * offset / np.linalg.norm(offset)
    if kind == "noise":
        return target + 0.4 * rng.normal(size=target.shape)
    return 1.0 - target


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
