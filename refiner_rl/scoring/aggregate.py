"""From per-reward scores to GRPO advantages (TRL's semantics, plus failed-reward handling).

Notation: ``r[i, k]`` is reward ``k`` of sample ``i`` (NaN = that reward could not score the sample), ``w[k]``
its weight, ``g(i)`` the group of sample ``i`` (same condition: instruction + draft + reference).
``mean_g`` and ``std_g`` are taken over the group's samples that have a value, ``std`` with Bessel's
correction like TRL's ``nanstd`` (undefined, NaN, for fewer than two values), ``eps = 1e-4``.

Total reward (both aggregations log it)::

    total[i] = sum over k with r[i, k] not NaN of  w[k] * r[i, k]      (NaN when no reward scored i)

A missing reward contributes nothing, as in TRL (``nansum``); a sample that *no* reward scored is
``valid = False``: it is left out of every mean and std and gets advantage 0 (never turn a failure
into a fake bad score).

``aggregation="sum_then_normalize"`` (TRL's default)::

    A[i] = (total[i] - mean_g(total)) / (S + eps)
    S = std_g(total)  for scale_rewards="group";  std over the batch's valid totals for "batch";
    no division       for scale_rewards="none".

``aggregation="normalize_then_sum"`` (GDPO; TRL's ``multi_objective_aggregation``)::

    z[i, k] = (r[i, k] - mean_g(r[:, k])) / (std_g(r[:, k]) + eps)      (NaN stays NaN)
    s[i]    = sum over k with z[i, k] not NaN of  w[k] * z[i, k]
    A[i]    = (s[i] - mean_batch(s)) / (std_batch(s) + eps)             ("group" or "batch", as TRL)
    A[i]    =  s[i] - mean_batch(s)                                     ("none")

Then, for both: ``A = clip(A, -adv_clip_max, adv_clip_max)`` when set, and ``A = 0`` where invalid or
undefined (a group with a single valid sample has no baseline: its advantage is 0).

Metrics (TRL's names where TRL has one): ``reward`` (mean valid total), ``reward_std`` (mean over groups of
``std_g(total)``; TRL 1.16 logs the batch std under this name, we log the per-group one because it is what
the advantages divide by), ``frac_reward_zero_std`` (fraction of groups whose total has zero or undefined std:
groups with no learning signal), ``rewards/<name>/mean`` and ``/std`` (raw, NaN-aware), ``/failed_frac`` (NaN
fraction), ``reward_failed_frac`` (fraction of samples no reward scored) and, with clipping,
``adv_clipped_frac``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [N], 0 where invalid
    total_reward: torch.Tensor  # [N], NaN where invalid
    valid: torch.Tensor  # [N] bool: at least one reward scored the sample
    metrics: dict[str, float] = field(default_factory=dict)


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq, inverse = torch.unique(torch.as_tensor(group_ids).reshape(-1), return_inverse=True)
    return inverse, int(uniq.numel())


def group_nanmean(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group mean over dim 0 ignoring NaN: ``[G, ...]`` (NaN for a group with no value)."""
    ok = ~torch.isnan(x)
    count = torch.zeros((n_groups, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, inverse, ok.to(x.dtype))
    total = torch.zeros_like(count).index_add_(0, inverse, torch.where(ok, x, torch.zeros_like(x)))
    return total / count  # 0/0 = NaN where the group has no value


def group_nanstd(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group standard deviation over dim 0 ignoring NaN, Bessel-corrected (NaN for fewer than 2 values)."""
    ok = ~torch.isnan(x)
    mean = group_nanmean(x, inverse, n_groups)
    count = torch.zeros_like(mean).index_add_(0, inverse, ok.to(x.dtype))
    sq = torch.where(ok, (x - mean[inverse]) ** 2, torch.zeros_like(x))
    var = torch.zeros_like(mean).index_add_(0, inverse, sq) / (count - 1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of all non-NaN entries (NaN for fewer than 2)."""
    v = x[~torch.isnan(x)]
    return v.std() if v.numel() > 1 else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def weighted_total(rewards: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, valid)``: NaN-aware weighted sum over rewards ``[N, R]`` and whether any reward scored."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards.device).reshape(1, -1)
    valid = ~torch.isnan(rewards).all(dim=1)
    total = (rewards * weights).nansum(dim=1)
    return torch.where(valid, total, torch.full_like(total, float("nan"))), valid


def compute_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[int],
    scale_rewards: ScaleRewards = "group",
    aggregation: Aggregation = "sum_then_normalize",
    adv_clip_max: float | None = None,
    eps: float = 1e-4,
    names: Sequence[str] | None = None,
) -> AdvantageResult:
    """GRPO advantages from rewards ``[N, R]`` (NaN = not scored); the formulas are in the module docstring.

    ``group_ids`` ``[N]``: equal id = same condition. ``names`` label the per-reward metrics
    (default ``reward_0``, ``reward_1``...).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.ndim == 1:
        r = r[:, None]
    n, k = r.shape
    w = torch.as_tensor(weights, dtype=torch.float64, device=r.device).reshape(-1)
    if w.numel() != k:
        raise ValueError(f"{k} reward columns but {w.numel()} weights")
    names = list(names) if names is not None else [f"reward_{j}" for j in range(k)]
    if len(names) != k:
        raise ValueError(f"{k} reward columns but {len(names)} names")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(f"aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}")
    inverse, n_groups = _group_index(torch.as_tensor(group_ids, device=r.device))
    if inverse.numel() != n:
        raise ValueError(f"{n} samples but {inverse.numel()} group ids")

    total, valid = weighted_total(r, w)
    group_std = group_nanstd(total, inverse, n_groups)  # [G]

    if aggregation == "sum_then_normalize":
        adv = total - group_nanmean(total, inverse, n_groups)[inverse]
        if scale_rewards == "group":
            adv = adv / (group_std[inverse] + eps)
        elif scale_rewards == "batch":
            adv = adv / (nanstd(total) + eps)
    else:
        z = (r - group_nanmean(r, inverse, n_groups)[inverse]) / (group_nanstd(r, inverse, n_groups)[inverse] + eps)
        s = (z * w[None, :]).nansum(dim=1)
        s = torch.where(valid, s, torch.full_like(s, float("nan")))
        adv = s - s[valid].mean() if bool(valid.any()) else s
        if scale_rewards != "none":
            adv = adv / (nanstd(s) + eps)

    adv = torch.where(valid, adv, torch.zeros_like(adv))
    adv = torch.nan_to_num(adv, nan=0.0)
    metrics: dict[str, float] = {}
    if adv_clip_max is not None:
        metrics["adv_clipped_frac"] = float((adv.abs() > adv_clip_max).double().mean()) if n else 0.0
        adv = adv.clamp(-adv_clip_max, adv_clip_max)

    metrics["reward"] = float(total[valid].mean()) if bool(valid.any()) else float("nan")
    defined = group_std[~torch.isnan(group_std)]
    metrics["reward_std"] = float(defined.mean()) if defined.numel() else float("nan")
    zero = torch.isnan(group_std) | torch.isclose(group_std, torch.zeros_like(group_std), rtol=0.0, atol=1e-8)
    metrics["frac_reward_zero_std"] = float(zero.double().mean()) if n_groups else 0.0
    metrics["reward_failed_frac"] = float((~valid).double().mean()) if n else 0.0
    for j, name in enumerate(names):
        col = r[:, j]
        ok = ~torch.isnan(col)
        metrics[f"rewards/{name}/mean"] = float(col[ok].mean()) if bool(ok.any()) else float("nan")
        metrics[f"rewards/{name}/std"] = float(nanstd(col))
        metrics[f"rewards/{name}/failed_frac"] = float((~ok).double().mean()) if n else 0.0

    out_dtype = torch.as_tensor(rewards).dtype if torch.as_tensor(rewards).is_floating_point() else torch.float32
    return AdvantageResult(adv.to(out_dtype), total.to(out_dtype), valid, metrics)


def spatial_advantages(
    maps: torch.Tensor, group_ids: torch.Tensor | Sequence[int], eps: float = 1e-4, fill: float | None = None
) -> torch.Tensor:
    """Group-normalised per-patch rewards: for every patch position ``(y, x)``, across the group's samples,

        A[i, y, x] = (m[i, y, x] - mean_g(m[:, y, x])) / (std_g(m[:, y, x]) + eps)

    with NaN-aware statistics (Bessel-corrected std). ``maps`` is ``[N, h, w]`` (NaN = patch not scored).
    The result is NaN where the map is NaN or the position has fewer than two scored samples in the group
    (no baseline), unless ``fill`` is given, which replaces those NaNs (e.g. ``0.0``, or mix with the scalar
    advantage in the trainer). The trainer resizes it to the token grid.
    """
    m = torch.as_tensor(maps)
    dtype = m.dtype if m.is_floating_point() else torch.float32
    m = m.to(torch.float64)
    inverse, n_groups = _group_index(torch.as_tensor(group_ids, device=m.device))
    if inverse.numel() != m.shape[0]:
        raise ValueError(f"{m.shape[0]} maps but {inverse.numel()} group ids")
    mean = group_nanmean(m, inverse, n_groups)[inverse]
    std = group_nanstd(m, inverse, n_groups)[inverse]
    adv = (m - mean) / (std + eps)  # NaN where m or std is NaN
    if fill is not None:
        adv = torch.nan_to_num(adv, nan=float(fill))
    return adv.to(dtype)
