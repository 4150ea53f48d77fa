"""``dreamsim``: DreamSim distance between the output and the target (↓), whole image or the mask's crop.

    value = 1 - cos(embed(x), embed(x_target))      (DreamSim's distance; 0 for identical images)

``region: whole`` resizes both whole images to 224; ``region: crop`` crops both to the mask's bounding box grown by
``dilation`` pixels first (an empty mask skips the record). OmniRefiner (arXiv 2511.19990) reports DreamSim ↓.
The model is the ``patch_dreamsim`` reward's: loaded by :func:`refiner_rl.rewards.patch_dreamsim.load_dreamsim`
from ``cache_dir`` (never downloaded implicitly; missing files fail at once naming this metric), distances in
batches of ``batch_size`` pairs across records by :meth:`PatchDreamSim.patch_distances`.
"""

from __future__ import annotations

import math
import os

import torch

from refiner_rl.metrics.base import Metric, Scored, loading, register_metric
from refiner_rl.scoring.patches import crop_resize, mask_bbox


@register_metric
class DreamSimDistance(Metric):
    kind = "dreamsim"
    higher_is_better = False
    required_fields = ("target",)

    def __init__(
        self,
        region: str = "whole",
        dilation: int = 16,
        cache_dir: str | None = None,
        dreamsim_type: str = "dino_vitb16",
        batch_size: int = 32,
        device: str | None = None,
        label: str | None = None,
        model: torch.nn.Module | None = None,
    ):
        from refiner_rl.rewards.patch_dreamsim import DREAMSIM_SIZE, PatchDreamSim

        if region not in ("whole", "crop"):
            raise ValueError(f"region must be 'whole' or 'crop', got {region!r}")
        self.region, self.dilation, self.size = region, int(dilation), DREAMSIM_SIZE
        self.name = label or ("dreamsim" if region == "whole" else "dreamsim_crop")
        with loading(self.name):
            self.scorer = PatchDreamSim(
                cache_dir=os.path.expanduser(cache_dir) if cache_dir else None,
                dreamsim_type=dreamsim_type,
                batch_size=batch_size,
                model=model,
                device=device,
            )

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        a, b, scored, notes = [], [], [], []
        for i in range(outputs.shape[0]):
            x, y = outputs[i].float().cpu(), records["target"][i].float()
            box = (0, x.shape[-2], 0, x.shape[-1])
            if self.region == "crop":
                box = mask_bbox(records["mask"][i], self.dilation)
                if box is None:
                    notes.append("empty region")
                    continue
            a.append(crop_resize(x, [box], self.size))
            b.append(crop_resize(y, [box], self.size))
            scored.append(i)
            notes.append(None)
        values = torch.full((outputs.shape[0],), math.nan, dtype=torch.float64)
        if scored:
            values[scored] = self.scorer.patch_distances(torch.cat(a), torch.cat(b)).double()
        return Scored(values, notes)
