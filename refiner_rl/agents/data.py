"""Decomposition records and their TRL form.

A record is ``{"image": ..., "instruction": "...", "decomposition": [{"action", "subject", "goal"}, ...]}``
(optional ``id``). In a JSONL file ``image`` is a path relative to the file; from ``datasets`` it may also be
an image feature. :func:`load_decomposition_dataset` validates every record (a :class:`DataError` naming the
first bad one) and returns a ``datasets.Dataset`` in the conversational VLM form TRL's ``GRPOTrainer`` takes:
``prompt`` = chat messages with string content (TRL puts the image placeholder before the user's text),
``image`` = the image (decoded lazily), ``decomposition`` = the ground truth the rewards read, ``id``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from refiner_rl.agents.plan import COMPONENTS, format_plan
from refiner_rl.errors import DataError

SYSTEM_PROMPT = (
    "You are an image-editing planner. Split the user's editing instruction for the image into atomic edits. "
    "Write each edit as <action>verb</action><subject>what is edited</subject><goal>the result wanted</goal>, "
    "one edit per line, and nothing else."
)
USER_TEMPLATE = "Instruction: {instruction}"


def planner_messages(instruction: str, system_prompt: str | None = None) -> list[dict]:
    """The planner's prompt as chat messages with string content (TRL adds the image to the user turn)."""
    system = SYSTEM_PROMPT if system_prompt is None else system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": USER_TEMPLATE.format(instruction=instruction.strip())}]


def with_image(messages: list[dict], image: Any) -> list[dict]:
    """The same chat with the image as the first part of the first user turn (what TRL builds at training)."""
    out, placed = [], False
    for m in messages:
        content = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else list(m["content"])
        if m["role"] == "user" and not placed:
            content, placed = [{"type": "image", "image": image}, *content], True
        out.append({"role": m["role"], "content": content})
    return out


def _name(record: dict, index: int) -> str:
    rid = record.get("id")
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def validate_decomposition(value: Any, where: str) -> list[dict[str, str]]:
    """The ground-truth triples of a record, or a :class:`DataError` saying what is wrong with them."""
    if isinstance(value, dict) and all(isinstance(value.get(c), list) for c in COMPONENTS):  # datasets' dict of lists
        value = [dict(zip(COMPONENTS, row)) for row in zip(*(value[c] for c in COMPONENTS))]
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise DataError(f"{where}: no ground-truth `decomposition`; give a list of {{action, subject, goal}}")
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f"{where}: `decomposition` must be a list of {{action, subject, goal}}, got {type(value).__name__}"
        )
    triples = []
    for k, t in enumerate(value):
        if not isinstance(t, dict):
            raise DataError(f"{where}: decomposition[{k}] must be an object with action, subject and goal")
        for c in COMPONENTS:
            v = t.get(c)
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: decomposition[{k}].{c} is missing or empty")
            if "<" in v or ">" in v:
                raise DataError(f"{where}: decomposition[{k}].{c} contains '<' or '>', which the plan format reserves")
        triples.append({c: " ".join(t[c].split()) for c in COMPONENTS})
    return triples


def _image_value(record: dict, where: str, base_dir: str | None) -> Any:
    value = record.get("image")
    if value is None:
        raise DataError(f"{where}: no `image`")
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise DataError(f"{where}: image file not found: {path}")
        return path
    return value  # PIL image or a datasets image dict: datasets encodes it


def validate_records(records: Sequence[dict], base_dir: str | None) -> list[dict]:
    """Checked records with absolute image paths and normalised triples; the first bad one raises."""
    out = []
    for i, r in enumerate(records):
        where = _name(r, i)
        if not isinstance(r, dict):
            raise DataError(f"{where}: a record must be an object, got {type(r).__name__}")
        instruction = r.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: `instruction` is missing or empty")
        out.append(
            {
                "id": str(r.get("id", i)),
                "image": _image_value(r, where, base_dir),
                "instruction": instruction.strip(),
                "decomposition": validate_decomposition(r.get("decomposition"), where),
            }
        )
    if not out:
        raise DataError("the decomposition data set has no records")
    return out


def read_records(source: Any, split: str = "train") -> tuple[list[dict], str | None]:
    """Raw records and the folder their relative image paths resolve against, from a JSONL file, a folder
    holding ``records.jsonl``, a ``datasets.Dataset``, or a dataset name for ``datasets.load_dataset``."""
    import json

    if hasattr(source, "column_names"):
        return [dict(r) for r in source], None
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "records.jsonl")
    if path.endswith((".jsonl", ".json")):
        if not os.path.isfile(path):
            raise DataError(f"decomposition records not found: {path}")
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}: line {line_no} is not valid JSON ({err})") from err
        return records, os.path.dirname(os.path.abspath(path))
    import datasets

    try:
        return [dict(r) for r in datasets.load_dataset(os.fspath(source), split=split)], None
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"cannot read decomposition records from {source!r}: {err}") from err


def to_trl_dataset(records: Sequence[dict], system_prompt: str | None = None):
    """Checked records as a ``datasets.Dataset`` with ``prompt``, ``image``, ``decomposition``, ``id``, ``solution``.

    ``solution`` is the ground truth written in the plan format (for logging and SFT warm-starts)."""
    import datasets

    rows = {
        "id": [r["id"] for r in records],
        "prompt": [planner_messages(r["instruction"], system_prompt) for r in records],
        "image": [r["image"] for r in records],
        "instruction": [r["instruction"] for r in records],
        "decomposition": [r["decomposition"] for r in records],
        "solution": [format_plan(r["decomposition"]) for r in records],
    }
    ds = datasets.Dataset.from_dict(rows)
    return ds.cast_column("image", datasets.Image(mode="RGB"))


def load_decomposition_dataset(source: Any, split: str = "train", system_prompt: str | None = None):
    """Read, validate and convert decomposition records (see the module docstring)."""
    records, base_dir = read_records(source, split)
    return to_trl_dataset(validate_records(records, base_dir), system_prompt)
