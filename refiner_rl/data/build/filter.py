"""Stage 4, filter and split: keep triplets whose draft is wrong inside the mask and right outside it, then split
them by source image into train and held-out.

Per record, with the masked metrics of :mod:`refiner_rl.metrics.masked` (draft vs target, ``M`` the mask):
``mse_inside = masked_mse(draft, target, M)``, ``mse_outside = masked_mse(draft, target, 1 - M)``,
``psnr_inside = 10 log10(1 / mse_inside)``. Dropped: ``draft_right_inside`` when ``mse_inside < min_inside_mse``
(nothing to refine), ``draft_wrong_outside`` when ``mse_outside > max_outside_mse`` (the degradation leaked out of
the region), ``psnr_inside`` when above ``max_inside_psnr``.

Split: the kept records' source images are ordered by a seeded hash of their id and the first
``round(heldout_fraction * n)`` (at least one when the fraction is > 0 and there are two sources or more) go to
``heldout``; every record of a source goes where its source goes, so no image is in both.
"""

from __future__ import annotations

import math
import zlib

import datasets
import torch

from refiner_rl.data.build.common import DROP, StageContext, dropped, from_png, kept
from refiner_rl.data.images import to_tensor
from refiner_rl.metrics.masked import masked_mse, psnr_from_mse

METRICS = ("mse_inside", "mse_outside", "psnr_inside")


def _measure(row: dict, *, config) -> dict:
    draft, target = to_tensor(from_png(row["draft"]))[None], to_tensor(from_png(row["target"]))[None]
    mask = (to_tensor(from_png(row["mask"], mask=True))[None] >= 0.5).float()
    inside, outside = float(masked_mse(draft, target, mask)[0]), float(masked_mse(draft, target, 1 - mask)[0])
    outside = 0.0 if math.isnan(outside) else outside  # the mask covers the whole image: nothing outside
    values = {"mse_inside": inside, "mse_outside": outside, "psnr_inside": float(psnr_from_mse(torch.tensor(inside)))}
    where = f"record {row['id']!r} (source image {row['source_id']!r})"
    if not inside >= config.min_inside_mse:
        return dropped(
            "draft_right_inside",
            f"{where}: MSE inside the mask {inside:.3g} < min_inside_mse {config.min_inside_mse}",
            values,
        )
    if outside > config.max_outside_mse:
        why = f"{where}: MSE outside the mask {outside:.3g} > max_outside_mse {config.max_outside_mse}"
        return dropped("draft_wrong_outside", why, values)
    if config.max_inside_psnr is not None and values["psnr_inside"] > config.max_inside_psnr:
        why = f"{where}: PSNR inside the mask {values['psnr_inside']:.2f} dB > max_inside_psnr {config.max_inside_psnr}"
        return dropped("psnr_inside", why, values)
    return kept(values)


def heldout_sources(source_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The source images whose records are held out (module docstring)."""
    uniq = sorted(set(source_ids), key=lambda s: (zlib.crc32(f"{seed}:{s}".encode()), s))
    n = round(fraction * len(uniq))
    if fraction > 0 and len(uniq) >= 2:
        n = min(max(n, 1), len(uniq) - 1)
    return set(uniq[:n])


def filter_and_split(ds: datasets.Dataset, config, ctx: StageContext) -> datasets.Dataset:
    """Stage 4 (module docstring): adds the metrics and ``split`` (``train`` or ``heldout``) to every record."""
    features = datasets.Features({**ds.features, **{k: datasets.Value("float64") for k in METRICS}, **DROP})
    ds = ctx.map(
        ds, _measure, step="measure", num_proc=config.num_proc, fn_kwargs={"config": config}, features=features
    )
    live = [sid for sid, d in zip(ds["source_id"], ds["_drop"]) if not d]
    held = heldout_sources(live, config.heldout_fraction, config.seed)
    return ds.add_column("split", ["heldout" if sid in held else "train" for sid in ds["source_id"]])
