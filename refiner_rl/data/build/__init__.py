"""``refiner-rl data build``: clean images -> (target, reference, draft, mask) triplets in four cached stages.

1. :mod:`~refiner_rl.data.build.ingest`: decode, size check, resize to buckets, perceptual-hash de-duplication;
2. :mod:`~refiner_rl.data.build.region`: the region to refine and a reference that is never pixel-aligned;
3. :mod:`~refiner_rl.data.build.degrade`: the draft, from composable operators recorded per record;
4. :mod:`~refiner_rl.data.build.filter`: keep drafts wrong inside the mask and right outside; split by source.

:func:`build_dataset` runs them with a cache per stage (:mod:`~refiner_rl.data.build.runner`) and writes the
splits and the report (:mod:`~refiner_rl.data.build.write`).
"""

from refiner_rl.data.build.config import DataBuildConfig
from refiner_rl.data.build.runner import build_dataset

__all__ = ["DataBuildConfig", "build_dataset"]
