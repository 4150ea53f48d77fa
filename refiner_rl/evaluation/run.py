"""``refiner-rl eval``'s engine: every candidate sampled alike on the held-out records, scored by every metric.

:func:`evaluate_candidates` shards the records across processes (``accelerate launch``: rank ``r`` of ``w`` takes
records ``r, r + w, ...``), loads one candidate at a time, runs :func:`refiner_rl.evaluation.loop.run_policy` and
gathers the per-record rows once at the end (each record is held by exactly one process, so it is gathered once).
Per-record noise is keyed by the record, so the table does not depend on the number of processes. The main process
writes ``results.md`` (the table), ``results.json`` (settings, summary, per-record values), ``samples.png`` (the
grid) and, with ``report_to: wandb``, a W&B run.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from refiner_rl.errors import ConfigError
from refiner_rl.evaluation.candidates import Candidate, candidate_settings, check_candidate, load_candidate
from refiner_rl.evaluation.loop import SamplerSettings, run_policy
from refiner_rl.evaluation.report import grid_rows, log_wandb, markdown_table, summaries, write_json
from refiner_rl.metrics.base import Metric

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What the main process returns (other processes get ``table = ""`` and empty dicts)."""

    table: str = ""
    summary: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def _process_state():
    from accelerate import PartialState

    from refiner_rl.distributed import prepare_cpu_distributed

    prepare_cpu_distributed()
    return PartialState()


def _load(cand: Candidate, model_args, serving: dict, device):
    """The candidate's policy with its ``reference_positions`` (saved or explicit; unset: the recipe's)."""
    positions = serving[cand.name]["reference_positions"]
    if positions is not None and positions != model_args.reference_positions:
        model_args = dataclasses.replace(model_args, reference_positions=positions)
    return load_candidate(cand, model_args, device)


def _view(dataset, values: dict, views: dict):
    """``dataset`` serving references as ``values`` says (cached in ``views`` by alignment and registration)."""
    alignment, registration = values["reference_alignment"], values["registration"]
    if alignment is None:
        return dataset
    key = (alignment, tuple(sorted((registration or {}).items())))
    if key not in views:
        if hasattr(dataset, "with_reference_alignment"):
            views[key] = dataset.with_reference_alignment(alignment, registration)
        elif getattr(dataset, "reference_alignment", alignment) != alignment:
            raise ConfigError(
                f"the evaluation dataset ({type(dataset).__name__}) cannot serve reference_alignment {alignment!r}: "
                "pass a TripletDataset"
            )
        else:
            views[key] = dataset
    return views[key]


def evaluate_candidates(
    candidates: Sequence[Candidate],
    dataset,
    metrics: Sequence[Metric],
    model_args,
    *,
    sampler: SamplerSettings | None = None,
    batch_size: int = 8,
    grid_records: int = 4,
    output_dir: str | None = None,
    report_to: str = "none",
    wandb_project: str = "refiner-rl",
    run_name: str | None = None,
    progress: bool = True,
    max_records: int | None = None,
    reference_alignment: str | None = None,
) -> EvalResult:
    """Sample and score every candidate on ``dataset``; on the main process write the outputs (when
    ``output_dir`` is given) and return the table, the summaries and the per-record rows.

    ``dataset`` may be a function of the size multiple the editor needs (``size_multiple``): it is then built
    once the first candidate's policy is loaded.

    A checkpoint holding ``refiner_rl_model.json`` is served with its saved ``reference_alignment`` (the records'
    references registered to their drafts, or not) and ``reference_positions`` unless ``reference_alignment`` (the
    data's explicit setting; None = unset) or ``model_args.reference_positions`` set them; a disagreeing explicit
    setting is a ConfigError naming the candidate and the file."""
    from tqdm.auto import tqdm

    sampler = sampler or SamplerSettings()
    serving = {}
    for cand in candidates:
        check_candidate(cand)
        serving[cand.name] = candidate_settings(cand, model_args, reference_alignment)
    state = _process_state()
    rank, world = state.process_index, state.num_processes
    first = next((c for c in candidates if not c.is_draft), None)
    loaded = _load(first, model_args, serving, state.device) if first is not None else None
    if callable(dataset):
        dataset = dataset(loaded.size_multiple if loaded is not None else 1)
    views: dict = {}
    served = dataset  # as built: what a candidate without saved or explicit settings sees
    if first is not None:  # the draft row and the grid show the references the first candidate sees
        dataset = _view(served, serving[first.name], views)
    n = len(dataset) if max_records is None else min(len(dataset), int(max_records))
    indices = list(range(rank, n, world))
    keep = set(range(min(grid_records, n)))
    columns = [c for m in metrics for c in m.columns]
    rows: dict[str, list[dict]] = {}
    kept: dict[str, dict[int, torch.Tensor]] = {}
    bar = tqdm(
        total=len(indices) * len(candidates),
        desc="eval records",
        unit="rec",
        disable=not (progress and state.is_main_process),
    )
    for cand in candidates:
        bar.set_postfix_str(cand.name)
        if cand is first:
            policy, loaded = loaded, None  # loaded before the loop to size the dataset
        else:
            policy = _load(cand, model_args, serving, state.device)
        view = dataset if cand.is_draft else _view(served, serving[cand.name], views)
        rows[cand.name], kept[cand.name] = run_policy(
            policy, view, indices, metrics, sampler, batch_size=batch_size, keep=keep, progress=bar
        )
        del policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()

    if world > 1:  # one gather of every record's rows (and the grid's images)
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (rows, kept))
        rows = {
            c.name: sorted((r for part, _ in gathered for r in part[c.name]), key=lambda r: r["index"])
            for c in candidates
        }
        kept = {c.name: {i: t for _, part in gathered for i, t in part[c.name].items()} for c in candidates}
    if not state.is_main_process:
        return EvalResult()

    summary = summaries(rows, columns)
    notes = [m.describe() for m in metrics]
    table = markdown_table(summary, columns, notes)
    files = {}
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        settings = {
            "sampler": sampler.as_dict(),
            "candidates": [vars(c) for c in candidates],
            "serving": {
                name: {k: v for k, v in values.items() if k != "registration" and v is not None}
                for name, values in serving.items()
            },
            "metrics": [{"column": c, "higher_is_better": up} for c, up in columns],
            "records": n,
            "processes": world,
            "notes": [n for n in notes if n],
        }
        files["table"] = os.path.join(output_dir, "results.md")
        with open(files["table"], "w") as f:
            f.write(table + "\n")
        files["json"] = os.path.join(output_dir, "results.json")
        write_json(files["json"], settings, summary, rows)
        grid = grid_rows(dataset, {c.name: kept[c.name] for c in candidates if not c.is_draft}, sorted(keep))
        if grid:
            from refiner_rl.reporting import save_grid

            files["grid"] = os.path.join(output_dir, "samples.png")
            save_grid(files["grid"], grid)
        if report_to == "wandb":
            log_wandb(wandb_project, run_name, output_dir, settings, summary, columns, table, files.get("grid"))
    return EvalResult(table=table, summary=summary, records=rows, files=files)
