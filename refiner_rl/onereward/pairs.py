"""Preference pairs for the judge: loading and checking records.

A record (one JSON line; image paths relative to the file)::

    {"image_a": "a.png", "image_b": "b.png", "task": "refine", "dimension": "detail_fidelity",
     "preferred": "a", "reference": "ref.png", "source": "src.png", "mask": "mask.png", "prompt": "...", "id": "..."}

``source``, ``mask``, ``reference`` and ``prompt`` are optional, except that a task's ``context`` images
(:mod:`refiner_rl.onereward.templates`) must be there and ``text_alignment`` needs the prompt. A record with a
missing or unreadable image, an unknown task or dimension, a dimension the task has no template for, or an equal
preference (anything but ``a``/``b``: the pairwise loss needs a winner) raises a :class:`DataError` naming the
record, or, with ``skip_invalid=True``, is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from refiner_rl.data.images import open_file
from refiner_rl.data.validation import record_name
from refiner_rl.errors import DataError
from refiner_rl.onereward.templates import CONTEXT_FIELDS, JudgeTemplates

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
IMAGE_FIELDS = ("image_a", "image_b", *CONTEXT_FIELDS)


class PairRecordError(DataError):
    """A bad preference record; the message names the record and the field."""


@dataclass
class PairSet:
    """Checked records (image paths made absolute, ``preferred`` lower-cased) and the skipped ones' reasons."""

    records: list[dict]
    skipped: list[str] = field(default_factory=list)
    source: str = "pairs"

    def to_dataset(self):
        """The records as a ``datasets.Dataset`` (images stay paths; the collator opens them)."""
        import datasets

        columns = ("id", "image_a", "image_b", "task", "dimension", "preferred", "prompt", *CONTEXT_FIELDS)
        return datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in self.records])


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairRecordError(f"{path} line {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise PairRecordError(f"{path} line {line_no}: a record must be a JSON object")
            rows.append(row)
    return rows


def check_pair(record: dict, index: int, templates: JudgeTemplates, base_dir: str | None, where: str) -> dict:
    """One checked record with absolute image paths, or a :class:`PairRecordError` naming it and the field."""
    name = f"{where}: {record_name(record, index)}"
    preferred = str(record.get("preferred") or "").strip().lower()
    if preferred not in ("a", "b"):
        raise PairRecordError(
            f"{name}: preferred={record.get('preferred')!r} is not a preference for one image (an equal preference or "
            "none); the pairwise loss needs a winner: 'a' or 'b'"
        )
    task, dim = record.get("task"), record.get("dimension")
    if task not in templates.tasks:
        raise PairRecordError(
            f"{name}: unknown task {task!r}; known: {', '.join(templates.tasks)} (or add it to the templates)"
        )
    if dim not in templates.dimensions:
        raise PairRecordError(
            f"{name}: unknown dimension {dim!r}; known: {', '.join(templates.dimensions)} (or add it to the templates)"
        )
    if dim not in templates.task_dimensions(task):
        raise PairRecordError(
            f"{name}: task {task!r} has no template for dimension {dim!r}; its dimensions: "
            f"{', '.join(templates.task_dimensions(task))} (or list {dim!r} under the task in the templates)"
        )
    if dim == "text_alignment" and templates.include_prompt != "never" and not str(record.get("prompt") or "").strip():
        raise PairRecordError(f"{name}: dimension text_alignment needs the record's `prompt`")
    for needed in templates.needs(task):
        if record.get(needed) in (None, ""):
            raise PairRecordError(
                f"{name}: task {task!r} shows the judge the {needed!r} image, but the record has none"
            )
    out = {k: v for k, v in record.items() if k not in IMAGE_FIELDS}
    for key in IMAGE_FIELDS:
        value = record.get(key)
        if value in (None, ""):
            if key in ("image_a", "image_b"):
                raise PairRecordError(f"{name}: missing {key}")
            continue
        image = open_file(value, base_dir=base_dir, where=f"{name} {key}")  # DataError on a missing file
        image.close()
        out[key] = os.path.abspath(os.path.join(base_dir or "", value)) if isinstance(value, str) else value
    if out["image_a"] == out["image_b"]:
        raise PairRecordError(
            f"{name}: image_a and image_b are the same file: an equal preference; the loss needs two images"
        )
    out["preferred"], out["prompt"] = preferred, str(record.get("prompt") or "")
    out["id"] = str(record.get("id", index))
    return out


def load_pairs(source: str | list[dict], templates: JudgeTemplates, *, skip_invalid: bool = False) -> PairSet:
    """Checked preference records from a JSONL file, a folder holding :data:`PAIRS_FILE`, or a list of dicts
    (paths relative to the working directory). Bad records raise, or are skipped and counted (``skip_invalid``)."""
    if isinstance(source, list):
        rows, base_dir, where = source, None, "pairs"
    else:
        path = os.path.join(source, PAIRS_FILE) if os.path.isdir(source) else source
        if not os.path.exists(path):
            raise DataError(f"preference records not found: {path} (a JSONL file, or a folder with {PAIRS_FILE})")
        rows, base_dir, where = read_jsonl(path), os.path.dirname(os.path.abspath(path)), path
    records, skipped = [], []
    for i, row in enumerate(rows):
        try:
            records.append(check_pair(row, i, templates, base_dir, where))
        except DataError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
    if skipped:
        logger.warning("skipped %d invalid preference record(s) of %s; first: %s", len(skipped), where, skipped[0])
    if not records:
        raise DataError(f"{where}: no usable preference records ({len(skipped)} skipped)")
    return PairSet(records, skipped, where)
