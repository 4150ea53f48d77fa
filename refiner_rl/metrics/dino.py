"""``dino``: cosine similarity of DINOv2 embeddings of the output and the target (↑), whole image or mask crop.

    value = cos(DINOv2_cls(x), DINOv2_cls(x_target))     (1 for identical images)

OmniRefiner (arXiv 2511.19990) reports "DINOv2 similarity" ↑. This is the ``dino_similarity`` reward run as a
metric: ``region: whole`` is its ``region: full``, ``region: crop`` its ``region: bbox`` (mask box grown by
``dilation``; an empty mask skips the record). The model is loaded by
:func:`refiner_rl.rewards.dino_similarity.load_dinov2` (``model_name_or_path``: hub id in the local cache or a
local folder; missing weights fail at once naming this metric); all records of a batch go through batched forwards.
"""

from __future__ import annotations

import math

import torch

from refiner_rl.metrics.base import Metric, Scored, loading, register_metric


@register_metric
class DinoMetric(Metric):
    kind = "dino"
    higher_is_better = True
    required_fields = ("target",)

    def __init__(
        self,
        region: str = "whole",
        model_name_or_path: str = "facebook/dinov2-base",
        dilation: int = 16,
        pooling: str = "cls",
        image_size: int = 224,
        batch_size: int = 32,
        device: str | None = None,
        label: str | None = None,
    ):
        from refiner_rl.rewards.dino_similarity import DinoSimilarity

        if region not in ("whole", "crop"):
            raise ValueError(f"region must be 'whole' or 'crop', got {region!r}")
        self.name = label or ("dino" if region == "whole" else "dino_crop")
        with loading(self.name):
            self.scorer = DinoSimilarity(
                model_name_or_path=model_name_or_path,
                region="full" if region == "whole" else "bbox",
                dilation=dilation,
                pooling=pooling,
                image_size=image_size,
                batch_size=batch_size,
                device=device,
            )

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        columns = {"target": list(records["target"]), "mask": list(records["mask"])}
        scores = self.scorer.score(records["prompt"], list(outputs.float().cpu()), **columns)
        values = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float64)
        return Scored(values, [None if s is not None else "empty region" for s in scores])
