"""``change_outside``: how much the output changed outside the mask, mean ``|x - draft|`` over ``1 - M`` (↓).

0 means the output kept the draft outside the region exactly (e.g. with paste-back). Needs no target. See
:func:`refiner_rl.metrics.masked.change_outside`.
"""

from __future__ import annotations

import torch

from refiner_rl.metrics.base import Metric, Scored, register_metric
from refiner_rl.metrics.masked import change_outside


@register_metric
class ChangeOutside(Metric):
    kind = "change_outside"
    higher_is_better = False
    required_fields = ("draft",)

    def __init__(self, label: str | None = None):
        self.name = label or "change_out"

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        values = change_outside(outputs, records["draft"].to(outputs.device), records.get("mask")).cpu()
        return Scored(values, [None if v == v else "empty region" for v in values.tolist()])
