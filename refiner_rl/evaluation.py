"""Held-out evaluation of a refiner: ODE samples, their error inside and outside the mask, and reward means.

One evaluator for the trainers, the demo and scripts: :func:`evaluate`. Sampling goes through
:func:`refiner_rl.sampling.sample_images` (the rollout's sampler without its SDE window), scoring through
:func:`refiner_rl.scoring.score_batch`, so held-out numbers and training rewards are measured the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from refiner_rl.data import TripletDataset, collate_triplets
from refiner_rl.policies.kontext import KontextPolicy
from refiner_rl.sampling import sample_images
from refiner_rl.scoring.aggregate import weighted_total
from refiner_rl.scoring.batch import score_batch
from refiner_rl.scoring.registry import reward_labels

NON_COLUMNS = ("prompt", "prompt_embeds", "pooled_prompt_embeds")  # batch keys that are not reward columns


def masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image ``sum(W * mean_c (a - b)^2) / sum(W)``; NaN where ``W`` is empty."""
    err = (a.float() - b.float()).pow(2).mean(1, keepdim=True)
    w = weight.float()
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


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
    policy: KontextPolicy,
    dataset: TripletDataset,
    *,
    num_steps: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    start_sigma: float = 1.0,
    paste: bool = False,
    true_cfg_scale: float = 1.0,
    negative_prompt: str = "",
    rewards: Sequence | None = None,
    reward_weights: Sequence[float] | None = None,
    reward_names: Sequence[str] | None = None,
    reward_extras: dict | None = None,
    transformer=None,
) -> dict[str, float]:
    """Held-out metrics of ODE samples (batch ``i`` draws its noise from ``seed + i``: two policies are compared on
    the same draws).

    With targets: ``mse_output_in`` / ``mse_output_out`` (mean over images of the masked MSE against the target,
    inside / outside the mask), the same for the draft (``mse_draft_*``) and ``mse_in_ratio = output_in /
    draft_in``; an image whose region is empty is left out of that mean.
    With ``rewards`` (weights ``w``, default 1): ``rewards/<name>/mean`` over the samples the reward scored,
    ``rewards/<name>/failed_frac``, ``reward`` = mean over samples of ``sum_k w_k r_k`` over the rewards that scored
    it, and ``reward_failed_frac``: a sample no reward scored is excluded, never counted as 0. ``reward_extras``
    are passed to every reward call as they are (e.g. TRL's ``trainer_state``)."""
    rewards = list(rewards or [])
    names = list(reward_names or reward_labels(rewards))
    weights = torch.tensor(list(reward_weights) if reward_weights is not None else [1.0] * len(rewards))
    mse: dict[str, list[torch.Tensor]] = {k: [] for k in ("output_in", "output_out", "draft_in", "draft_out")}
    scores = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_triplets)
    for i, batch in enumerate(loader):
        out = sample_images(
            policy,
            batch,
            num_steps=num_steps,
            seed=seed + i,
            start_sigma=start_sigma,
            paste=paste,
            true_cfg_scale=true_cfg_scale,
            negative_prompt=negative_prompt,
            micro_batch=batch_size,
            transformer=transformer,
        ).cpu()
        if "target" in batch:
            t, d, m = batch["target"], batch["draft"], batch["mask"]
            for name, a, w in (("output", out, m), ("draft", d, m)):
                mse[f"{name}_in"].append(masked_mse(a, t, w))
                mse[f"{name}_out"].append(masked_mse(a, t, 1 - w))
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
