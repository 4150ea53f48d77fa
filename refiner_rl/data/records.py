"""Triplet records: (prompt, draft, reference, target, mask), loaded, validated and batched.

Sources (``load_records``):
- a JSONL file whose image fields are paths relative to the file's folder (or absolute);
- a parquet file (paths, or image structs with ``bytes`` as ``datasets`` writes them);
- a folder holding ``records.jsonl`` or ``metadata.jsonl``;
- any ``datasets`` dataset, given as an object or as ``load_dataset`` arguments.

Every record is validated up front (``validate_records``): a missing file, an unreadable image, a size
mismatch between target, draft and mask, or an empty mask raises :class:`RecordError` naming the record
and the field, or, with ``skip_invalid``, is skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("draft", "reference", "target", "mask")
REQUIRED_FIELDS = ("prompt", "draft", "reference")


class RecordError(ValueError):
    """A bad training record. The message names the record and the field."""


def _record_name(record: dict, index: int) -> str:
    rid = record.get("id")
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def open_image(value: Any, *, base_dir: str | None, mode: str, where: str) -> Image.Image:
    """Open an image given as a path, bytes, a ``datasets`` image dict or a PIL image."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            else:
                return open_image(value["path"], base_dir=base_dir, mode=mode, where=where)
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if base_dir and not os.path.isabs(path):
                path = os.path.join(base_dir, path)
            if not os.path.exists(path):
                raise RecordError(f"{where}: file not found: {path}")
            img = Image.open(path)
        else:
            raise RecordError(f"{where}: expected an image path, bytes or image, got {type(value).__name__}")
        img.load()
        return img.convert(mode)
    except RecordError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise RecordError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> float tensor ``[C, H, W]`` in [0, 1]."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)


def fit_size(height: int, width: int, resolution: int | None, multiple: int) -> tuple[int, int]:
    """Size with about ``resolution**2`` pixels, the same aspect ratio, both sides multiples of ``multiple``.
    ``resolution=None`` keeps the area and only rounds to the multiple."""
    scale = 1.0 if not resolution else (resolution * resolution / float(height * width)) ** 0.5
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def nearest_bucket(height: int, width: int, buckets: list[int]) -> int:
    """The bucket (a side length) closest to the image's own size, ``sqrt(H W)``."""
    side = (height * width) ** 0.5
    return min(buckets, key=lambda b: abs(b - side))


def load_records(source: Any, *, split: str = "train", **load_kwargs) -> tuple[list[dict], str | None]:
    """Read raw records from a JSONL/parquet file, a folder, or a ``datasets`` dataset.

    Returns the records and the folder relative paths resolve against."""
    if isinstance(source, (list, tuple)):
        return [dict(r) for r in source], None
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # a datasets.Dataset
        return [dict(r) for r in source], None
    path = os.fspath(source)
    if os.path.isdir(path):
        for name in ("records.jsonl", "metadata.jsonl", "train.jsonl"):
            if os.path.isfile(os.path.join(path, name)):
                return load_records(os.path.join(path, name))
        parquet = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
        if parquet:
            return load_records(os.path.join(path, parquet[0]))
        raise FileNotFoundError(f"data folder {path!r} has no records.jsonl, metadata.jsonl or *.parquet")
    if path.endswith(".jsonl") or path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        records = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{path}: line {line_no} is not valid JSON ({e})") from e
        return records, os.path.dirname(os.path.abspath(path))
    if path.endswith(".parquet"):
        import datasets

        ds = datasets.Dataset.from_parquet(path)
        return [dict(r) for r in ds], os.path.dirname(os.path.abspath(path))
    import datasets  # a hub/local dataset name for load_dataset

    ds = datasets.load_dataset(path, split=split, **load_kwargs)
    return [dict(r) for r in ds], None


@dataclass
class ValidationReport:
    kept: int
    skipped: list[str]


def validate_record(record: dict, index: int, base_dir: str | None) -> None:
    """Raise :class:`RecordError` if the record cannot be trained on."""
    name = _record_name(record, index)
    for key in REQUIRED_FIELDS:
        if record.get(key) in (None, ""):
            raise RecordError(f"{name}: missing field {key!r}")
    if record.get("target") in (None, "") and not record.get("_allow_no_target"):
        raise RecordError(f"{name}: missing field 'target'")
    sizes = {}
    for key in IMAGE_FIELDS:
        if record.get(key) in (None, ""):
            continue
        img = open_image(
            record[key], base_dir=base_dir, mode="L" if key == "mask" else "RGB", where=f"{name}, field {key!r}"
        )
        sizes[key] = img.size
        if key == "mask" and img.getextrema()[1] < 128:
            raise RecordError(
                f"{name}, field 'mask': the mask is empty (no pixel >= 128); drop the record or give a region"
            )
    base = sizes.get("target") or sizes.get("draft")
    for key in ("draft", "mask"):
        if key in sizes and sizes[key] != base:
            raise RecordError(
                f"{name}: size mismatch: {key!r} is {sizes[key][0]}x{sizes[key][1]} but 'target' is {base[0]}x{base[1]} "
                "(draft, target and mask must have the same size; the reference may differ)"
            )


def validate_records(
    records: list[dict], base_dir: str | None, *, skip_invalid: bool = False
) -> tuple[list[dict], ValidationReport]:
    kept, skipped = [], []
    for i, r in enumerate(records):
        try:
            validate_record(r, i, base_dir)
            kept.append(r)
        except RecordError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if skipped:
        logger.warning("skipped %d invalid record(s) of %d; first: %s", len(skipped), len(records), skipped[0])
    if not kept:
        raise RecordError("no valid record left after validation")
    return kept, ValidationReport(len(kept), skipped)


class TripletDataset(Dataset):
    """Validated triplet records as tensors.

    Items: ``prompt`` (str), ``draft``/``target`` ``[3, H, W]``, ``reference`` ``[3, Hr, Wr]``, ``mask``
    ``[1, H, W]`` (all ones when the record has none), ``index`` (int), and ``prompt_embeds`` /
    ``pooled_prompt_embeds`` when the record carries precomputed text embeddings.
    Images are resized to ``resolution`` (or the nearest of ``buckets``), sides multiples of ``multiple``.
    """

    def __init__(
        self,
        records: list[dict],
        base_dir: str | None = None,
        *,
        resolution: int | None = None,
        buckets: list[int] | None = None,
        multiple: int = 16,
        validate: bool = True,
        skip_invalid: bool = False,
        require_target: bool = True,
    ):
        if not require_target:
            records = [dict(r, _allow_no_target=True) for r in records]
        if validate:
            records, self.report = validate_records(records, base_dir, skip_invalid=skip_invalid)
        else:
            self.report = ValidationReport(len(records), [])
        self.records, self.base_dir = records, base_dir
        self.resolution, self.buckets, self.multiple = resolution, sorted(buckets) if buckets else None, multiple

    @classmethod
    def from_source(cls, source: Any, **kwargs) -> TripletDataset:
        records, base_dir = load_records(source)
        return cls(records, base_dir, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: dict, index: int, key: str, mode: str = "RGB") -> Image.Image:
        return open_image(
            record[key], base_dir=self.base_dir, mode=mode, where=f"{_record_name(record, index)}, field {key!r}"
        )

    def _size(self, w: int, h: int) -> tuple[int, int]:
        res = nearest_bucket(h, w, self.buckets) if self.buckets else self.resolution
        return fit_size(h, w, res, self.multiple)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        draft = self._image(r, index, "draft")
        h, w = self._size(*draft.size)
        ref = self._image(r, index, "reference")
        rh, rw = self._size(*ref.size)
        item = {
            "prompt": r["prompt"],
            "index": index,
            "draft": to_tensor(draft.resize((w, h), Image.BICUBIC)),
            "reference": to_tensor(ref.resize((rw, rh), Image.BICUBIC)),
        }
        if r.get("target") not in (None, ""):
            item["target"] = to_tensor(self._image(r, index, "target").resize((w, h), Image.BICUBIC))
        if r.get("mask") not in (None, ""):
            m = to_tensor(self._image(r, index, "mask", "L").resize((w, h), Image.NEAREST))
            item["mask"] = (m >= 0.5).float()
        else:
            item["mask"] = torch.ones(1, h, w)
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            if r.get(key) is not None:
                item[key] = torch.as_tensor(r[key], dtype=torch.float32)
        return item

    def bucket_of(self, index: int) -> tuple[int, int, int, int]:
        """(H, W, Hr, Wr) after resizing, read from image headers only: the key of a size bucket."""
        r = self.records[index]
        with Image.open(self._path(r["draft"])) if isinstance(r["draft"], str) else self._image(r, index, "draft") as d:
            h, w = self._size(*d.size)
        with (
            Image.open(self._path(r["reference"]))
            if isinstance(r["reference"], str)
            else self._image(r, index, "reference") as ref
        ):
            rh, rw = self._size(*ref.size)
        return h, w, rh, rw

    def _path(self, p: str) -> str:
        return p if os.path.isabs(p) or not self.base_dir else os.path.join(self.base_dir, p)


def collate_triplets(items: Iterable[dict]) -> dict:
    """Stack items of one size bucket into a batch; a clear error when sizes differ."""
    items = list(items)
    out: dict[str, Any] = {
        "prompt": [it["prompt"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    for key in ("draft", "reference", "target", "mask", "prompt_embeds", "pooled_prompt_embeds"):
        if key not in items[0]:
            continue
        shapes = {tuple(it[key].shape) for it in items}
        if len(shapes) > 1:
            raise RecordError(
                f"records {[it['index'] for it in items]} have different {key!r} sizes {sorted(shapes)} in one batch: "
                "set `resolution` so all images are resized alike, use `buckets` (batches are then drawn per bucket), "
                "or use per_device_train_batch_size 1"
            )
        out[key] = torch.stack([it[key] for it in items])
    return out


class BucketBatchOrderSampler(torch.utils.data.Sampler):
    """Yields indices so every consecutive run of ``batch_size`` shares one size bucket.

    Indices are shuffled within each bucket with ``seed + epoch``; incomplete tails are dropped, so a
    batch never mixes sizes. Used when the dataset has ``buckets``."""

    def __init__(self, dataset: TripletDataset, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        groups: dict = {}
        for i in range(len(dataset)):
            groups.setdefault(dataset.bucket_of(i), []).append(i)
        self.groups = list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for idx in self.groups:
            perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            batches += [
                perm[i : i + self.batch_size] for i in range(0, len(perm) - self.batch_size + 1, self.batch_size)
            ]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def __iter__(self):
        for b in self._batches():
            yield from b

    def __len__(self) -> int:
        return sum(len(idx) // self.batch_size for idx in self.groups) * self.batch_size
