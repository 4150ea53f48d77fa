"""``masked_psnr``: PSNR (dB) of the masked MSE against the target (↑).

    value = 10 * log10(1 / masked_mse(x, x_target, W)),   W = M (``region: inside``) or 1 - M (``outside``)

An exact match (MSE 0) is reported as ``max_db`` (default 100 dB, an MSE of 1e-10) so means stay finite. A record
whose region is empty is skipped. See :mod:`refiner_rl.metrics.masked`.
"""

from __future__ import annotations

import torch

from refiner_rl.metrics.base import Metric, Scored, register_metric
from refiner_rl.metrics.masked import masked_psnr


@register_metric
class MaskedPSNR(Metric):
    kind = "masked_psnr"
    higher_is_better = True
    required_fields = ("target",)

    def __init__(self, region: str = "inside", max_db: float = 100.0, label: str | None = None):
        if region not in ("inside", "outside"):
            raise ValueError(f"region must be 'inside' or 'outside', got {region!r}")
        self.region, self.max_db = region, float(max_db)
        self.name = label or ("psnr_in" if region == "inside" else "psnr_out")

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        m = records["mask"].to(outputs.device)
        w = m if self.region == "inside" else 1 - m
        values = masked_psnr(outputs, records["target"].to(outputs.device), w).cpu().clamp(max=self.max_db)
        return Scored(values, [None if v == v else "empty region" for v in values.tolist()])
