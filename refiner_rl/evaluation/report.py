"""What an evaluation writes: per-candidate summaries (mean ± 95% CI), the Markdown table, the per-record JSON,
the PNG grid and the W&B run.

    mean = (1/n) sum_i v_i,   CI95 = 1.96 * s / sqrt(n),   s^2 = sum_i (v_i - mean)^2 / (n - 1)

over the n records a metric scored (normal approximation; no CI for n < 2). Records a metric skipped or failed
on are counted per candidate and listed under the table with their reasons.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import torch

Z95 = 1.96


def summarize(values: list[float | None]) -> dict:
    """``{mean, ci95, n, total}`` of per-record values (``None`` = not scored)."""
    x = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    n = int(x.numel())
    mean = float(x.mean()) if n else math.nan
    ci = float(Z95 * x.std(unbiased=True) / math.sqrt(n)) if n >= 2 else math.nan
    return {"mean": mean, "ci95": ci, "n": n, "total": len(values)}


def summaries(records: dict[str, list[dict]], columns: list[tuple[str, bool]]) -> dict[str, dict[str, dict]]:
    """Per candidate and column: :func:`summarize` plus ``not_scored`` (reason -> count)."""
    out = {}
    for cand, rows in records.items():
        out[cand] = {}
        for col, _ in columns:
            s = summarize([r["values"].get(col) for r in rows])
            s["not_scored"] = dict(Counter(r["notes"][col] for r in rows if col in r["notes"]))
            out[cand][col] = s
    return out


def _cell(s: dict) -> str:
    if s["n"] == 0:
        return "n/a"
    mean, ci = s["mean"], s["ci95"]
    digits = 4 if abs(mean) < 10 else 2
    text = f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")
    return text + (f" ({s['n']}/{s['total']})" if s["n"] < s["total"] else "")


def markdown_table(summary: dict, columns: list[tuple[str, bool]], notes: list[str] = ()) -> str:
    """Candidates x metrics, ``mean ± CI95`` (``(n/N)`` where some records were not scored), then the notes:
    metric descriptions (e.g. the judge) and, per metric and candidate, how many records were skipped or failed and
    why."""
    head = "| candidate | " + " | ".join(f"{c} {'↑' if up else '↓'}" for c, up in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for cand, row in summary.items():
        lines.append(f"| {cand} | " + " | ".join(_cell(row[c]) for c, _ in columns) + " |")
    extra = [n for n in notes if n]
    for col, _ in columns:
        for cand, row in summary.items():
            reasons = row[col]["not_scored"]
            if reasons:
                why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
                extra.append(
                    f"{col}, {cand}: {sum(reasons.values())} of {row[col]['total']} records not scored ({why})"
                )
    if extra:
        lines += [""] + [f"- {n}" for n in extra]
    return "\n".join(lines)


def write_json(path: str, settings: dict, summary: dict, records: dict[str, list[dict]]) -> None:
    """``settings``, ``summary`` and ``records``: per record index, its prompt and every candidate's values and notes
    (a value a metric could not give is ``null``, its reason in ``notes``)."""
    indices = sorted({r["index"] for rows in records.values() for r in rows})
    by_cand = {c: {r["index"]: r for r in rows} for c, rows in records.items()}
    prompts = {r["index"]: r.get("prompt", "") for rows in records.values() for r in rows}
    per_record = [
        {
            "index": i,
            "prompt": prompts.get(i, ""),
            "values": {c: by_cand[c][i]["values"] for c in records if i in by_cand[c]},
            "notes": {c: by_cand[c][i]["notes"] for c in records if i in by_cand[c] and by_cand[c][i]["notes"]},
        }
        for i in indices
    ]
    with open(path, "w") as f:
        json.dump(_no_nan({"settings": settings, "summary": summary, "records": per_record}), f, indent=2)


def _no_nan(obj):
    """NaN (no mean, no interval) as JSON ``null``, so the file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def grid_rows(dataset, images: dict[str, dict[int, torch.Tensor]], indices: list[int]) -> list[list[torch.Tensor]]:
    """Rows draft | reference (or mask) | each candidate | target (when the data has targets) for ``indices``."""
    from refiner_rl.data.records import condition_image

    rows = []
    for i in indices:
        item = dataset[i]
        row = [item["draft"], condition_image(item), *[images[c][i] for c in images if i in images[c]]]
        if item.get("target") is not None:
            row.append(item["target"])
        rows.append(row)
    return rows


def log_wandb(
    project: str,
    run_name: str | None,
    out_dir: str,
    settings: dict,
    summary: dict,
    columns,
    table: str,
    grid: str | None,
) -> None:
    """One W&B run (offline without an API key) with the summary table, every mean as a scalar and the grid."""
    import wandb

    from refiner_rl.reporting import setup_wandb_env

    setup_wandb_env("wandb")
    run = wandb.init(project=project, name=run_name, dir=os.path.abspath(out_dir), config=settings, job_type="eval")
    cols = ["candidate"] + [f"{c} mean" for c, _ in columns] + [f"{c} ci95" for c, _ in columns]
    data = [
        [cand] + [row[c]["mean"] for c, _ in columns] + [row[c]["ci95"] for c, _ in columns]
        for cand, row in summary.items()
    ]
    payload = {"eval/table": wandb.Table(columns=cols, data=data), "eval/markdown": wandb.Html(f"<pre>{table}</pre>")}
    for cand, row in summary.items():
        payload.update({f"eval/{cand}/{c}": row[c]["mean"] for c, _ in columns})
    if grid:
        payload["eval/grid"] = wandb.Image(grid)
    run.log(payload)
    run.finish()
