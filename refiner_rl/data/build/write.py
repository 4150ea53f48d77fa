"""Writing the built triplets: per split a folder ``records.jsonl`` + PNG files (what
:class:`refiner_rl.data.TripletDataset` and ``refiner-rl sft --dataset`` read), a parquet copy with the images
inside, and the report (``report.json`` and ``report.md``)."""

from __future__ import annotations

import json
import os
import shutil

import datasets

IMAGES = ("target", "draft", "reference", "mask")
FIELDS = ("id", "prompt", *IMAGES, "source_id", "region", "ref_geometry", "ref_transform", "ref_box")
SPLITS = ("train", "heldout")


def _record(row: dict, images: dict[str, str]) -> dict:
    rec = {k: row[k] for k in FIELDS if k not in IMAGES}
    rec.update(images)
    if not rec["ref_transform"]:  # a reference given by the user: no known geometry
        del rec["ref_transform"], rec["ref_box"]
    rec["degradations"] = json.loads(row["degradations"])
    rec["metrics"] = {k: round(float(row[k]), 6) for k in ("mse_inside", "mse_outside", "psnr_inside")}
    return rec


def write_split(ds: datasets.Dataset, folder: str, parquet: str) -> int:
    """Write ``folder/records.jsonl``, ``folder/images/*.png`` and ``parquet``; the number of records."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, "images"))
    lines, rows = [], []
    for row in ds:
        names = {k: f"images/{row['id']}_{k}.png" for k in IMAGES}
        for k, name in names.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(row[k])
        rec = _record(row, names)
        lines.append(json.dumps(rec))
        rows.append({**rec, **{k: {"bytes": row[k], "path": None} for k in IMAGES}})
    with open(os.path.join(folder, "records.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    table = datasets.Dataset.from_list(
        [{**r, "degradations": json.dumps(r["degradations"]), "metrics": json.dumps(r["metrics"])} for r in rows]
    )
    for k in IMAGES:
        table = table.cast_column(k, datasets.Image(decode=False))
    table.to_parquet(parquet)
    return len(rows)


def write_outputs(ds: datasets.Dataset, output_dir: str) -> dict[str, int]:
    """Both splits (a split with no record is removed); ``{split: records}``."""
    counts = {}
    splits = ds["split"]
    for split in SPLITS:
        folder, parquet = os.path.join(output_dir, split), os.path.join(output_dir, f"{split}.parquet")
        rows = [i for i, s in enumerate(splits) if s == split]
        if not rows:
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(parquet):
                os.remove(parquet)
            counts[split] = 0
            continue
        counts[split] = write_split(ds.select(rows), folder, parquet)
    return counts


def write_report(report: dict, output_dir: str) -> None:
    """``report.json`` (everything) and ``report.md`` (a table of the stages)."""
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["| stage | in | kept | dropped (why) | cached |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        why = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"| {s['stage']} | {s['input']} | {s['kept']} | {why} | {'yes' if s['cached'] else 'no'} |")
    lines += ["", f"train: {report['outputs']['train']} records, heldout: {report['outputs']['heldout']} records"]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
