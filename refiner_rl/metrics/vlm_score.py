"""``vlm_score``: a VLM judge's P("Yes") that the output is good (↑), through the ``vlm_judge`` reward.

Every option of :class:`refiner_rl.rewards.vlm_judge.VLMJudge` applies (``mode``, ``compare_to``, ``dimension``,
``backend: local`` with ``model_name_or_path`` or ``backend: server`` with ``base_url``/``model``, the server's
timeouts); the default asks pairwise whether the output is better than the draft on detail fidelity, so 0.5 is
"no better than the draft". A record the judge could not answer (server timeout, bad reply) is counted as
failed for this metric, never scored 0. The table names the judge.
"""

from __future__ import annotations

import math

import torch

from refiner_rl.errors import CheckpointError, RewardError
from refiner_rl.metrics.base import Metric, Scored, loading, register_metric


def build_judge(name: str, **options):
    """A :class:`VLMJudge` for metric ``name``; loading and option errors name the metric."""
    from refiner_rl.rewards.vlm_judge import VLMJudge

    try:
        with loading(name):
            return VLMJudge(**options)
    except (ValueError, TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise RewardError(f"metric {name}: {' '.join(str(err).split())}") from err


def judge_name(judge) -> str:
    """The judge's model as the table shows it: the local path/id or the server's model (or URL)."""
    if judge.backend == "local":
        return str(getattr(judge.vlm.model, "name_or_path", "") or "local VLM")
    return str(judge.client.model or judge.client.api_url)


@register_metric
class VLMScore(Metric):
    kind = "vlm_score"
    higher_is_better = True

    def __init__(self, label: str | None = None, **judge_options):
        self.name = label or "vlm_score"
        self.judge = build_judge(self.name, **judge_options)
        self.required_fields = tuple(self.judge.required_fields)

    def describe(self) -> str:
        how = f"{self.judge.mode}" + (f" vs {self.judge.compare_to}" if self.judge.mode == "pairwise" else "")
        return f"{self.name}: P(Yes) of judge {judge_name(self.judge)} ({how}; {', '.join(self.judge.dimensions)})"

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        columns = {k: list(records[k]) for k in ("draft", "reference") if records.get(k) is not None}
        scores = self.judge.score(records["prompt"], list(outputs.float().cpu()), **columns)
        values = torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)
        return Scored(values, [None if s is not None else "judge gave no answer" for s in scores])
