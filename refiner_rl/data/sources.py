"""Where records come from, as a ``datasets.Dataset`` (memory-mapped for files: nothing is decoded here).

Sources (:func:`load_records`):
- a JSONL file whose image fields are paths relative to the file's folder (or absolute): read line by line into
  a dataset of ``(_line, _json)`` rows, cached by ``datasets`` under a key made of the file's absolute path,
  modification time and size, so a second start reads the cached Arrow file instead of the JSONL;
- a parquet file (paths, or image structs with ``bytes`` as ``datasets`` writes them), through
  ``Dataset.from_parquet`` (``datasets`` caches it by the file's path and modification time);
- a folder holding ``records.jsonl``, ``metadata.jsonl``, ``train.jsonl`` or ``*.parquet``;
- a ``datasets`` dataset, given as an object or as a name for ``load_dataset``;
- a list of record dicts (images as PIL images, paths or bytes), held in memory.

Image columns are kept undecoded (``datasets.Image(decode=False)``); records are decoded one at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import datasets

from refiner_rl.errors import DataError

# Bump when the way a JSONL line becomes a row changes, so old cached Arrow files are not reused.
JSONL_FORMAT = 1


@dataclass
class RecordSource:
    """Undecoded records: ``dataset`` rows, the folder relative paths resolve against, and a name for messages.
    ``jsonl`` is True when rows are ``(_line, _json)`` pairs still to be parsed."""

    dataset: datasets.Dataset
    base_dir: str | None
    name: str
    jsonl: bool = False


def _jsonl_rows(path: str, mtime_ns: int, size: int, version: int):
    """Every non-blank line of a JSONL file, with its 1-based line number (``mtime_ns``, ``size`` and ``version``
    only key the ``datasets`` cache)."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield {"_line": line_no, "_json": line}


def parse_jsonl_row(row: dict, name: str) -> dict:
    """The record of one JSONL row; a :class:`DataError` naming the file and line when it is not a JSON object."""
    try:
        record = json.loads(row["_json"])
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: line {row['_line']} is not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise DataError(
            f"{name}: line {row['_line']} is a JSON {type(record).__name__}, not an object; "
            'each line must be one record like {"prompt": ..., "draft": ..., "reference": ..., "target": ...}'
        )
    return record


def _undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    for key, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(key, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):  # several references
            if feature.feature.decode:
                ds = ds.cast_column(key, datasets.List(datasets.Image(decode=False)))
    return ds


def load_records(source: Any, *, split: str = "train", cache_dir: str | None = None, **load_kwargs) -> RecordSource:
    """Undecoded records of ``source`` (see the module docstring); ``cache_dir`` is where ``datasets`` keeps the
    Arrow files of file sources (default: its own cache, ``HF_DATASETS_CACHE``)."""
    if isinstance(source, RecordSource):
        return source
    if isinstance(source, (list, tuple)):
        return RecordSource(_undecoded(_from_list(source)), None, "records")
    if isinstance(source, datasets.Dataset):
        return RecordSource(_undecoded(source), None, "dataset")
    path = os.fspath(source)
    if os.path.isdir(path):
        for name in ("records.jsonl", "metadata.jsonl", "train.jsonl"):
            if os.path.isfile(os.path.join(path, name)):
                return load_records(os.path.join(path, name), cache_dir=cache_dir)
        parquet = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
        if parquet:
            return _parquet([os.path.join(path, f) for f in parquet], path, cache_dir)
        raise DataError(f"data folder {path!r} has no records.jsonl, metadata.jsonl, train.jsonl or *.parquet")
    if path.endswith((".jsonl", ".json")):
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        path = os.path.abspath(path)
        st = os.stat(path)
        kwargs = {"path": path, "mtime_ns": st.st_mtime_ns, "size": st.st_size, "version": JSONL_FORMAT}
        features = datasets.Features({"_line": datasets.Value("int64"), "_json": datasets.Value("string")})
        try:
            ds = datasets.Dataset.from_generator(_jsonl_rows, features=features, gen_kwargs=kwargs, cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as e:
            raise DataError(f"{path}: cannot be read ({e.__cause__ or e})") from e
        if len(ds) == 0:
            raise DataError(f"{path}: no records (the file is empty)")
        return RecordSource(ds, os.path.dirname(path), path, jsonl=True)
    if path.endswith(".parquet"):
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        return _parquet([path], os.path.dirname(os.path.abspath(path)), cache_dir)
    try:
        ds = datasets.load_dataset(path, split=split, cache_dir=cache_dir, **load_kwargs)
    except Exception as e:  # datasets raises several types for a name it cannot resolve offline
        raise DataError(
            f"dataset {path!r} is neither a JSONL/parquet file, a folder, nor a `datasets` name that loads "
            f"({type(e).__name__}: {e})"
        ) from e
    return RecordSource(_undecoded(ds), None, path)


def _from_list(records) -> datasets.Dataset:
    """In-memory records; every key of any record is a column (``None`` where a record lacks it)."""
    if not records:
        raise DataError("no records given (an empty list)")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"record {i}: expected a dict, got {type(r).__name__}")
    keys = list(dict.fromkeys(k for r in records for k in r))
    if any(isinstance(r.get("reference"), (list, tuple)) for r in records):  # one column: every reference a list
        records = [
            {
                **r,
                "reference": r["reference"]
                if isinstance(r.get("reference"), (list, tuple, type(None)))
                else [r["reference"]],
            }
            for r in records
        ]
    try:
        return datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
    except Exception as e:  # pyarrow: a field holding different kinds of values (image and path, text and number)
        raise DataError(
            f"records cannot form one table: a field mixes kinds of values ({type(e).__name__}: {e})"
        ) from e


def _parquet(files: list[str], base_dir: str, cache_dir: str | None) -> RecordSource:
    try:
        ds = datasets.Dataset.from_parquet(files if len(files) > 1 else files[0], cache_dir=cache_dir)
    except Exception as e:  # a corrupt or non-parquet file
        raise DataError(f"{files[0]}: cannot be read as parquet ({type(e).__name__}: {e})") from e
    return RecordSource(_undecoded(ds), os.path.abspath(base_dir), files[0] if len(files) == 1 else base_dir)
