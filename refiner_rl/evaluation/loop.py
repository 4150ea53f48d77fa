"""The one evaluation loop: sample a policy on records with a fixed sampler, score the outputs with metrics.

Record ``i``'s noise comes from ``keyed_generator(seed, i)``: it depends on what the record is, not on the batch
or the process holding it, so candidates compared on one dataset see the same noise and a sharded run samples
exactly what one process samples. Records are batched per size bucket, ``batch_size`` at a time, and every metric
scores a whole batch in one call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from refiner_rl.data import collate_triplets
from refiner_rl.distributed import keyed_generator
from refiner_rl.focus import FocusSettings
from refiner_rl.metrics.base import Metric
from refiner_rl.sampling import sample_images

NON_COLUMNS = ("prompt", "prompt_embeds", "pooled_prompt_embeds")  # batch keys that are not reward columns


@dataclass
class SamplerSettings:
    """How every candidate is sampled: ODE steps from ``start_sigma`` (1 = pure noise, below 1 the draft noised to
    it), paste-back of the draft outside the mask, true CFG with ``negative_prompt``; noise keyed by ``seed``."""

    num_steps: int = 10
    seed: int = 0
    start_sigma: float = 1.0
    paste: bool = False
    true_cfg_scale: float = 1.0
    negative_prompt: str = ""
    focus: FocusSettings | None = None  # region-focused refinement (refiner_rl.focus): refine the crop, paste back

    def as_dict(self) -> dict:
        return asdict(self)


def record_batches(dataset, indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """``indices`` in batches of at most ``batch_size`` records of one size bucket (in index order per bucket)."""
    by_bucket: dict = {}
    for i in indices:
        key = dataset.bucket_of(i) if getattr(dataset, "buckets", None) else None
        by_bucket.setdefault(key, []).append(int(i))
    for chunk in by_bucket.values():
        for s in range(0, len(chunk), batch_size):
            yield chunk[s : s + batch_size]


def load_batch(dataset, idx: Sequence[int]) -> dict:
    batch = collate_triplets([dataset[i] for i in idx])
    batch["index"] = torch.tensor(list(idx))
    return batch


@torch.no_grad()
def sample_batch(policy, batch: dict, sampler: SamplerSettings, transformer=None, generators=None) -> torch.Tensor:
    """The policy's outputs ``[B, 3, H, W]`` (CPU, [0, 1]) for a collated batch; the draft itself for ``None``.
    Record ``i``'s noise: ``keyed_generator(sampler.seed, i)``, or ``generators`` (one per sample) when given."""
    if policy is None:
        return batch["draft"].float().cpu()
    if generators is None:
        generators = [keyed_generator(sampler.seed, int(i)) for i in batch["index"]]
    return sample_images(
        policy,
        batch,
        num_steps=sampler.num_steps,
        generators=generators,
        start_sigma=sampler.start_sigma,
        paste=sampler.paste,
        true_cfg_scale=sampler.true_cfg_scale,
        negative_prompt=sampler.negative_prompt,
        micro_batch=len(batch["prompt"]),
        focus=sampler.focus,
        transformer=transformer,
    ).cpu()


def score_outputs(metrics: Sequence[Metric], outputs: torch.Tensor, batch: dict) -> list[dict]:
    """Per record of the batch: ``{"index", "prompt", "values": {column: float | None}, "notes": {column: why}}``."""
    rows = [{"index": int(i), "prompt": p, "values": {}, "notes": {}} for i, p in zip(batch["index"], batch["prompt"])]
    for metric in metrics:
        scored = metric(outputs, batch)
        values = scored.values.reshape(outputs.shape[0], -1)
        for j, (column, _) in enumerate(metric.columns):
            for r, row in enumerate(rows):
                v = float(values[r, j])
                row["values"][column] = None if math.isnan(v) else v
                if math.isnan(v):
                    row["notes"][column] = scored.notes[r] or "not scored"
    return rows


def run_policy(
    policy,
    dataset,
    indices: Sequence[int],
    metrics: Sequence[Metric],
    sampler: SamplerSettings,
    *,
    batch_size: int = 8,
    keep: set[int] | None = None,
    progress=None,
    transformer=None,
) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Sample ``policy`` (``None``: the draft) on ``indices`` and score every batch with ``metrics``: the
    per-record rows of :func:`score_outputs` and the outputs of the records in ``keep`` (for grids)."""
    rows, kept = [], {}
    for idx in record_batches(dataset, indices, batch_size):
        batch = load_batch(dataset, idx)
        outputs = sample_batch(policy, batch, sampler, transformer)
        rows += score_outputs(metrics, outputs, batch)
        for r, i in enumerate(idx):
            if keep and i in keep:
                kept[i] = outputs[r]
        if progress is not None:
            progress.update(len(idx))
    return rows, kept
