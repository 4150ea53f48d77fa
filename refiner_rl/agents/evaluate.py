"""Planner vs no planner on a batch of requests, scored 0-10 by a VLM judge.

Requests are a JSONL file of ``{"image": path, "instruction": "...", "reference"?: path, "id"?: ...}`` (paths
relative to the file). Every request is edited twice, with the planner and with the raw instruction, and each
final image is judged on ImageEdit-R1's three criteria (arXiv 2603.08059) with the project's ``vlm_judge``
reward, one question per criterion:

- ``completion``: pointwise, "has every change the instruction asks for been made?" (the instruction quoted);
- ``quality``: pointwise, "is the image sharp, natural and free of artifacts?";
- ``preservation``: pairwise against the input image, "is the content the instruction does not mention
  unchanged?".

Each criterion's score is ``10 * P(Yes)``, the request's score their mean; the report gives both modes' means
side by side. The paper's judge answers with a number; reading P(Yes) of a yes/no question is ours.
"""

from __future__ import annotations

import json
import math
import os

from refiner_rl.errors import DataError

CRITERIA = {
    "completion": {
        "mode": "pointwise",
        "dimension": "completion",
        "dimension_description": "request completion: every change the instruction asks for has been made",
        "include_prompt": "always",
    },
    "quality": {
        "mode": "pointwise",
        "dimension": "quality",
        "dimension_description": "image quality: the image is sharp, natural and free of artifacts",
    },
    "preservation": {
        "mode": "pairwise",
        "compare_to": "draft",
        "dimension": "preservation",
        "dimension_description": "preservation: content the instruction does not mention is unchanged",
        "include_prompt": "always",
        "template": "Image A is an edit of Image B.{prompt_clause} Judge {dimension_description}. "
        "Is the content of Image B that the instruction does not mention unchanged in Image A? Answer Yes or No.",
    },
}
TASK = {"task": "edit", "task_description": "instruction-guided image editing"}


def build_judges(judge: str, **options) -> dict:
    """One ``vlm_judge`` reward per criterion; ``judge`` is a local VLM folder / hub id or an http(s) server URL."""
    from refiner_rl.scoring.registry import build_reward

    backend = (
        {"backend": "server", "base_url": judge}
        if judge.startswith(("http://", "https://"))
        else {"backend": "local", "model_name_or_path": judge}
    )
    return {
        name: build_reward({"name": "vlm_judge", **TASK, **spec, **backend, **options})
        for name, spec in CRITERIA.items()
    }


def judge_images(judges: dict, instructions: list[str], finals: list, inputs: list) -> list[dict]:
    """Per image: each criterion's ``10 * P(Yes)`` (NaN where the judge could not answer) and their mean."""
    from torchvision.transforms.functional import pil_to_tensor

    def tensors(images):
        return [pil_to_tensor(im.convert("RGB")).float() / 255.0 for im in images]

    finals_t, inputs_t = tensors(finals), tensors(inputs)
    out = [{} for _ in finals]
    for name, reward in judges.items():
        scores = reward(instructions, finals_t, draft=inputs_t)
        for row, s in zip(out, scores):
            row[name] = math.nan if s is None else 10.0 * float(s)
    for row in out:
        row["score"] = sum(row[c] for c in CRITERIA) / len(CRITERIA)
    return out


def read_requests(path: str) -> list[dict]:
    """Requests with absolute image paths; a :class:`DataError` naming the first bad one."""
    if not os.path.isfile(path):
        raise DataError(f"requests file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not valid JSON ({err})") from err
            where = f"{path}: request on line {n}"
            if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
                raise DataError(f"{where} has no `instruction`")
            for key in ("image", "reference"):
                if r.get(key) is None:
                    continue
                r[key] = os.path.join(base, r[key]) if not os.path.isabs(r[key]) else r[key]
                if not os.path.isfile(r[key]):
                    raise DataError(f"{where}: {key} file not found: {r[key]}")
            if r.get("image") is None:
                raise DataError(f"{where} has no `image`")
            out.append({**r, "id": str(r.get("id", n))})
    return out


def _mean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def evaluate_requests(editor, planner, judges: dict, requests: list[dict], output_dir: str, **edit_kwargs) -> dict:
    """Edit every request with and without the planner, judge both, write ``report.json``; returns the report."""
    from PIL import Image

    from refiner_rl.agents.pipeline import run_edit

    modes = {"planner": planner, "no_planner": None}
    rows = []
    for r in requests:
        image = Image.open(r["image"]).convert("RGB")
        reference = Image.open(r["reference"]).convert("RGB") if r.get("reference") else None
        row = {"id": r["id"], "instruction": r["instruction"]}
        for mode, p in modes.items():
            folder = os.path.join(output_dir, r["id"], mode)
            plan = run_edit(
                editor, image, r["instruction"], planner=p, reference=reference, output_dir=folder, **edit_kwargs
            )
            final, start = Image.open(os.path.join(folder, "final.png")), Image.open(os.path.join(folder, "input.png"))
            row[mode] = {**judge_images(judges, [r["instruction"]], [final], [start])[0], "steps": len(plan["steps"])}
        rows.append(row)
    summary = {mode: {k: _mean([row[mode][k] for row in rows]) for k in (*CRITERIA, "score")} for mode in modes}
    report = {"summary": summary, "requests": rows}
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return report


def format_report(report: dict) -> str:
    """The side-by-side summary table."""
    lines = [f"{'':<14}{'planner':>10}{'no planner':>12}"]
    for key in (*CRITERIA, "score"):
        lines.append(
            f"{key:<14}{report['summary']['planner'][key]:>10.2f}{report['summary']['no_planner'][key]:>12.2f}"
        )
    return "\n".join(lines)
