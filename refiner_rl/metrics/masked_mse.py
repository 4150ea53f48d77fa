"""``masked_mse``: mean squared pixel error against the target inside (``region: inside``) or outside the mask.

    value = sum_p W_p * mean_c (x - x_target)^2 / sum_p W_p,   W = M (inside) or 1 - M (outside)

in [0, 1] pixels (↓). A record whose region is empty is skipped. See :mod:`refiner_rl.metrics.masked`.
"""

from __future__ import annotations

import torch

from refiner_rl.metrics.base import Metric, Scored, register_metric
from refiner_rl.metrics.masked import masked_mse


@register_metric
class MaskedMSE(Metric):
    kind = "masked_mse"
    higher_is_better = False
    required_fields = ("target",)

    def __init__(self, region: str = "inside", label: str | None = None):
        if region not in ("inside", "outside"):
            raise ValueError(f"region must be 'inside' or 'outside', got {region!r}")
        self.region = region
        self.name = label or ("mse_in" if region == "inside" else "mse_out")

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        m = records["mask"].to(outputs.device)
        values = masked_mse(outputs, records["target"].to(outputs.device), m if self.region == "inside" else 1 - m)
        return Scored(values.cpu(), [None if v == v else "empty region" for v in values.tolist()])
