"""Running the four stages with a cache per stage, then writing the dataset and the report.

Each stage's kept rows are saved under ``output_dir/stages/<n>-<name>/`` (``data/``, ``datasets``' save_to_disk
format, and ``stage.json``: its fingerprint and report). The fingerprint hashes :data:`STAGE_FORMAT`, the options
the stage reads (``DataBuildConfig.stage_options``) and the fingerprint of its input (the previous stage's, or the
source's content for stage 1). A stage reruns when its folder is missing, its fingerprint differs, or an earlier
stage reran in this run; otherwise its saved output is loaded. So deleting ``stages/3-degrade`` (or changing a
degrade option) reruns stages 3 and 4 only, and a run stopped mid-way resumes after its last finished stage. A
stage's folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable

import datasets
import numpy as np
from datasets.fingerprint import Hasher

from refiner_rl.data.build.common import StageContext
from refiner_rl.data.build.degrade import degrade
from refiner_rl.data.build.filter import filter_and_split
from refiner_rl.data.build.ingest import ingest, source_fingerprint
from refiner_rl.data.build.region import region_and_reference
from refiner_rl.data.build.write import write_outputs, write_report
from refiner_rl.errors import DataError

logger = logging.getLogger(__name__)

# Bump when a stage's output for the same options changes, so older caches are not reused.
STAGE_FORMAT = 1
STAGES = (
    ("ingest", ingest),
    ("region", region_and_reference),
    ("degrade", degrade),
    ("filter", filter_and_split),
)
EXAMPLES = 3  # messages kept per drop reason in the report


def _settle(ds: datasets.Dataset, stage: str, seconds: float) -> tuple[datasets.Dataset, dict]:
    """Count the rows' ``_drop`` reasons, keep the rows without one, and drop the protocol columns."""
    drops = np.asarray(list(ds["_drop"]), dtype=object)
    whys = list(ds["_why"])
    counts = Counter(d for d in drops if d)
    examples: dict[str, list[str]] = {}
    for d, w in zip(drops, whys):
        if d and len(examples.setdefault(d, [])) < EXAMPLES:
            examples[d].append(w)
    keep = np.flatnonzero(drops == "")
    out = ds.select(keep).remove_columns(["_drop", "_why"])
    report = {
        "stage": stage,
        "input": len(ds),
        "kept": len(keep),
        "dropped": dict(sorted(counts.items())),
        "examples": examples,
        "seconds": round(seconds, 3),
    }
    return out, report


def _load(folder: str, fingerprint: str) -> tuple[datasets.Dataset, dict] | None:
    meta_file = os.path.join(folder, "stage.json")
    if not os.path.isfile(meta_file):
        return None
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
        return None
    return datasets.load_from_disk(os.path.join(folder, "data")), meta["report"]


def _save(ds: datasets.Dataset, folder: str, fingerprint: str, report: dict) -> datasets.Dataset:
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(os.path.join(tmp, "data"))
    with open(os.path.join(tmp, "stage.json"), "w") as f:
        json.dump({"fingerprint": fingerprint, "report": report}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return datasets.load_from_disk(os.path.join(folder, "data"))


def build_dataset(config, editor: Callable[[], object] | None = None) -> dict:
    """Run the stages (module docstring), write the splits and the report; return the report. ``editor``: a
    zero-argument factory of the editor the ``vae`` / ``regenerate`` operators run (``refiner-rl data build`` gives
    :class:`refiner_rl.cli.data.BuildEditor`); called once, by the degrade stage, only when an operator needs it."""
    stages_dir = os.path.join(config.output_dir, "stages")
    os.makedirs(stages_dir, exist_ok=True)
    fingerprint = source_fingerprint(config)
    work = tempfile.mkdtemp(prefix=".work-", dir=stages_dir)
    reports, ds, stale = [], None, False
    try:
        for n, (name, run) in enumerate(STAGES, 1):
            label = f"{n}-{name}"
            folder = os.path.join(stages_dir, label)
            fingerprint = Hasher.hash([STAGE_FORMAT, name, config.stage_options(name), fingerprint])
            cached = None if stale else _load(folder, fingerprint)
            if cached is not None:
                ds, report = cached
                report = dict(report, cached=True)
                logger.info("stage %s: cached (%d kept)", label, report["kept"])
            else:
                stale = True  # every later stage reruns too
                start = time.perf_counter()
                raw = run(ds, config, StageContext(label, work, fingerprint, editor))
                ds, report = _settle(raw, label, time.perf_counter() - start)
                if not report["kept"]:
                    first = next(iter(report["examples"].values()), ["-"])[0]
                    raise DataError(
                        f"data build: no record left after stage {label} (dropped {report['dropped']}; e.g. {first})"
                    )
                ds = _save(ds, folder, fingerprint, report)
                report = dict(report, cached=False)
                logger.info(
                    "stage %s: ran in %.1fs: %d in, %d kept, dropped %s",
                    label,
                    report["seconds"],
                    report["input"],
                    report["kept"],
                    report["dropped"] or "none",
                )
            reports.append(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outputs = write_outputs(ds, config.output_dir)
    sources = {s: len({sid for sid, sp in zip(ds["source_id"], ds["split"]) if sp == s}) for s in outputs}
    report = {"source": config.source, "seed": config.seed, "stages": reports, "outputs": outputs, "sources": sources}
    write_report(report, config.output_dir)
    logger.info("wrote %d train and %d held-out records to %s", outputs["train"], outputs["heldout"], config.output_dir)
    return report
