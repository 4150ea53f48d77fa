"""Held-out evaluation of one policy for the trainers and the demo: :func:`evaluate`.

The same loop as ``refiner-rl eval`` (:mod:`refiner_rl.evaluation.loop`): ODE samples through
:func:`refiner_rl.sampling.sample_images` with per-record noise, the ``masked_mse`` metric plug-in inside and
outside the mask, and rewards through :func:`refiner_rl.scoring.score_batch`, so held-out numbers, the eval
command's table and training rewards are measured the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refiner_rl.evaluation.loop import NON_COLUMNS, SamplerSettings, load_batch, record_batches, sample_batch
from refiner_rl.metrics.masked_mse import MaskedMSE
from refiner_rl.scoring.aggregate import weighted_total
from refiner_rl.scoring.batch import score_batch
from refiner_rl.scoring.registry import reward_labels


def reward_columns(batch: dict) -> dict[str, list]:
    """The columns a reward receives besides prompts: every batch column, one entry per sample (tensors on CPU)."""
    out = {}
    for k, v in batch.items():
        if k in NON_COLUMNS:
            continue
        out[k] = list(v.cpu()) if isinstance(v, torch.Tensor) else list(v)
    return out


@torch.no_grad()
def evaluate(
    policy,
    dataset,
    sampler: SamplerSettings | None = None,
    *,
    batch_size: int = 16,
    rewards: Sequence | None = None,
    reward_weights: Sequence[float] | None = None,
    reward_names: Sequence[str] | None = None,
    reward_extras: dict | None = None,
    transformer=None,
) -> dict[str, float]:
    """Held-out metrics of ``sampler``'s samples (default :class:`SamplerSettings`; record ``i`` draws its noise
    from ``(sampler.seed, i)``: two policies are compared on the same draws).

    With targets: ``mse_output_in`` / ``mse_output_out`` (mean over images of the masked MSE against the target,
    inside / outside the mask), the same for the draft (``mse_draft_*``) and ``mse_in_ratio = output_in /
    draft_in``; an image whose region is empty is left out of that mean.
    With ``rewards`` (weights ``w``, default 1): ``rewards/<name>/mean`` over the samples the reward scored,
    ``rewards/<name>/failed_frac``, ``reward`` = mean over samples of ``sum_k w_k r_k`` over the rewards that scored
    it, and ``reward_failed_frac``: a sample no reward scored is excluded, never counted as 0. ``reward_extras``
    are passed to every reward call as they are (e.g. TRL's ``trainer_state``)."""
    sampler = sampler or SamplerSettings()
    rewards = list(rewards or [])
    names = list(reward_names or reward_labels(rewards))
    weights = torch.tensor(list(reward_weights) if reward_weights is not None else [1.0] * len(rewards))
    regions = {"in": MaskedMSE("inside"), "out": MaskedMSE("outside")}
    mse: dict[str, list[torch.Tensor]] = {f"{w}_{r}": [] for w in ("output", "draft") for r in regions}
    scores = []
    for idx in record_batches(dataset, range(len(dataset)), batch_size):
        batch = load_batch(dataset, idx)
        out = sample_batch(policy, batch, sampler, transformer)
        if "target" in batch:
            for who, images in (("output", out), ("draft", batch["draft"].float())):
                for r, metric in regions.items():
                    mse[f"{who}_{r}"].append(metric(images, batch).values)
        if rewards:
            columns = {**reward_columns(batch), **(reward_extras or {})}
            scores.append(score_batch(rewards, batch["prompt"], list(out), columns).scores)
    res: dict[str, float] = {}
    if mse["output_in"]:
        res = {f"mse_{k}": _nanmean(torch.cat(v)) for k, v in mse.items()}
        res["mse_in_ratio"] = res["mse_output_in"] / max(res["mse_draft_in"], 1e-12)
    if rewards:
        s = torch.cat(scores)
        total, valid = weighted_total(s, weights)
        res["reward"] = float(total[valid].mean()) if bool(valid.any()) else float("nan")
        res["reward_failed_frac"] = float((~valid).double().mean())
        for j, name in enumerate(names):
            res[f"rewards/{name}/mean"] = _nanmean(s[:, j])
            res[f"rewards/{name}/failed_frac"] = float(torch.isnan(s[:, j]).double().mean())
    return res


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double())) if x.numel() else float("nan")


def before_after_table(rows: Sequence[tuple[str, dict]]) -> str:
    """The demo's before/after table: one row per ``(label, evaluate(...) result)`` with the in-mask and outside MSE
    and the in-mask ratio to the draft, as the eval command's Markdown table (means only: ``evaluate`` keeps no
    per-record values). A result without targets shows ``n/a``."""
    from refiner_rl.evaluation.report import markdown_table

    columns = [("mse_in", False), ("mse_out", False), ("in / draft", False)]
    keys = {"mse_in": "mse_output_in", "mse_out": "mse_output_out", "in / draft": "mse_in_ratio"}
    summary = {}
    for label, r in rows:
        cells = {}
        for col, _ in columns:
            v = r.get(keys[col])
            known = v is not None and v == v
            cells[col] = {"mean": v if known else float("nan"), "ci95": float("nan"), "n": int(known), "total": 1}
            cells[col]["not_scored"] = {}
        summary[label] = cells
    return markdown_table(summary, columns)
