"""Score one batch with every reward: the one call the GRPO trainer, the evaluator and ``refiner-rl rewards score`` use.

:func:`score_batch` runs the sync rewards one after the other in the calling thread (as TRL does) while the async
ones (``async def`` reward functions, rewards with :attr:`~refiner_rl.scoring.base.Reward.is_async`) run
concurrently on the background loop (:mod:`refiner_rl.scoring.loop`). It never raises for a reward's failure: a
failed reward scores ``None`` for the batch, which becomes NaN in the score matrix, and is logged once per batch.

``deadline`` (seconds from the call) bounds the async rewards: one still running when it passes is cancelled and
scores NaN for the whole batch (sync rewards run in this thread and cannot be interrupted; rewards that wait on a
server, like ``vlm_judge``, are async for that reason and also bound their own wait).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refiner_rl.scoring import loop
from refiner_rl.scoring.base import Reward, ScoreResult, checked_result, failed_result, score_safely
from refiner_rl.scoring.registry import reward_labels

logger = logging.getLogger(__name__)


@dataclass
class BatchScores:
    """What :func:`score_batch` returns.

    ``scores[i, k]``: reward ``k`` of sample ``i`` (float32, NaN = not scored). ``maps[k]``: ``[n, h, w]`` per-patch
    values of reward ``k`` (NaN where a sample or patch has none), or ``None`` when the reward gave no map (or
    ``with_maps`` was off). ``errors``: label -> ``"ExceptionType: message"`` for rewards that failed on the
    whole batch. ``labels``: the rewards' unique labels (:func:`~refiner_rl.scoring.registry.reward_labels`),
    the metric names ``rewards/<label>/...``.
    """

    scores: torch.Tensor
    maps: list[torch.Tensor | None]
    errors: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    @property
    def failed_frac(self) -> dict[str, float]:
        """Per label, the fraction of samples without a score."""
        n = max(1, self.scores.shape[0])
        return {lab: float(torch.isnan(self.scores[:, k]).sum()) / n for k, lab in enumerate(self.labels)}


def stack_maps(maps: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """``[n, h, w]`` from per-sample maps, NaN for a sample without one; ``None`` when no sample has a map or
    their shapes differ."""
    shapes = {tuple(m.shape) for m in maps if m is not None}
    if len(shapes) != 1:
        return None
    (shape,) = shapes
    nan = torch.full(shape, math.nan)
    return torch.stack([nan if m is None else m.float() for m in maps])


async def _ascore_safely(reward: Reward, prompts: list[str], images: list[Any], columns: dict) -> ScoreResult:
    n = len(images)
    try:
        return checked_result(n, await reward.ascore(prompts, images, **columns))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a reward must never crash a run
        return failed_result(n, e)


async def _run_async(
    rewards: dict[int, Reward], prompts: list[str], images: list[Any], columns: dict, end: float | None
) -> dict[int, ScoreResult]:
    n = len(images)

    async def one(reward: Reward) -> ScoreResult:
        call = _ascore_safely(reward, prompts, images, columns)
        if end is None:
            return await call
        try:
            return await asyncio.wait_for(call, max(0.0, end - time.monotonic()))
        except asyncio.TimeoutError:
            return failed_result(n, "TimeoutError: the batch's deadline passed before it answered")

    results = await asyncio.gather(*(one(r) for r in rewards.values()))
    return dict(zip(rewards, results))


def score_batch(
    rewards: Sequence[Reward],
    prompts: Sequence[str],
    images: Sequence[Any],
    columns: Mapping[str, Any] | None = None,
    *,
    with_maps: bool = False,
    deadline: float | None = None,
) -> BatchScores:
    """Score ``images`` (float tensors ``[3, H, W]`` in [0, 1], or PIL) with every reward.

    ``columns``: the batch's fields aligned with ``images`` (``draft``, ``reference``, ``target``, ``mask``, any
    other column) plus extras passed as they are (e.g. TRL's ``trainer_state``). ``with_maps`` asks rewards that
    provide per-patch maps for them. ``deadline``: seconds from now after which async rewards still running
    are cancelled (their samples NaN). See the module docstring.
    """
    n, labels = len(images), reward_labels(rewards)
    if len(prompts) != n:
        raise ValueError(f"score_batch: {len(prompts)} prompts for {n} images")
    prompts, images, cols = list(prompts), list(images), dict(columns or {})
    end = None if deadline is None else time.monotonic() + float(deadline)
    pending = {k: r for k, r in enumerate(rewards) if getattr(r, "is_async", False)}
    future = None
    if pending:  # start them first: they wait on I/O while the sync rewards compute
        future = asyncio.run_coroutine_threadsafe(
            _run_async(pending, prompts, images, cols, end), loop.background_loop()
        )
    results: dict[int, ScoreResult] = {}
    for k, r in enumerate(rewards):
        if k not in pending:
            results[k] = score_safely(r, prompts, images, with_maps=with_maps, **cols)
    if future is not None:
        results.update(future.result())

    scores = torch.full((n, len(rewards)), math.nan)
    maps: list[torch.Tensor | None] = []
    errors: dict[str, str] = {}
    for k, label in enumerate(labels):
        res = results[k]
        scores[:, k] = torch.tensor([math.nan if s is None else s for s in res.scores], dtype=torch.float32)
        maps.append(stack_maps(res.maps) if with_maps else None)
        if res.error:
            errors[label] = res.error
        if res.n_failed:
            logger.warning(
                "reward %r could not score %d of %d samples%s",
                label,
                res.n_failed,
                n,
                f" ({res.error})" if res.error else "",
            )
    return BatchScores(scores, maps, errors, labels)
