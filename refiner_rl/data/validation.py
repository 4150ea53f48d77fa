"""Validating records in one streaming pass (``Dataset.map``, ``num_proc`` processes), cached by ``datasets``.

Each record is checked by decoding every image (:mod:`refiner_rl.data.images`): a missing field or file, an
unreadable image, decoded values out of range, a size mismatch between target, draft and mask, or an empty mask
gives a :class:`RecordError` naming the record and the field; a JSONL line that is not a JSON object names the
file and the line. A record's ``reference`` is one image or a list of them, each checked on its own (named
``field 'reference' [k]`` in a list). The pass stores, per record, the error (or none), the draft and first reference
sizes (so bucketing never opens an image again), which optional fields the record has and how many references.

Cache: for a file-backed source the pass writes ``refiner-rl-validation-<fingerprint>.arrow`` next to the
source's own ``datasets`` cache files, where ``<fingerprint>`` hashes the source dataset's fingerprint (for a
JSONL file: its path, modification time and size; for parquet: ``datasets``' hash of the files), the decoding
settings (``alpha_background``) and :data:`VALIDATION_FORMAT`. A second start with the same source and settings
reads that file and opens no image. An image edited in place without touching the records file is not seen:
touch the records file (or delete the cache) after editing images. In-memory sources are validated each time.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
from datasets.fingerprint import Hasher

from refiner_rl.data.images import load_image
from refiner_rl.data.sources import RecordSource, parse_jsonl_row
from refiner_rl.errors import DataError

logger = logging.getLogger(__name__)

# Bump when validation rules change, so cached results of older rules are not reused.
VALIDATION_FORMAT = 3
IMAGE_FIELDS = ("draft", "reference", "target", "mask")
REQUIRED_FIELDS = ("prompt", "draft", "reference", "target")
OPTIONAL_FIELDS = ("target", "mask", "prompt_embeds", "pooled_prompt_embeds", "reference", "task")
# Mask-guided task records (FLUX.1-Fill, OneReward): {image, mask, prompt?, task, target?, margin?}
MASK_TASKS = ("fill", "extend", "removal")
REMOVAL_PROMPT = "remove"  # the fixed instruction of object removal
DEFAULT_EXTEND_MARGIN = 0.25  # the band an `extend` record repaints, as a fraction of each side
SHOWN_SKIPS = 10  # skipped records named in the warning; the rest are counted
_FEATURES = datasets.Features(
    {
        "_error": datasets.Value("string"),
        **{k: datasets.Value("int32") for k in ("_h", "_w", "_rh", "_rw", "_has", "_nref")},
    }
)


class RecordError(DataError):
    """A bad training record. The message names the record and the field."""


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def references(record: dict) -> list:
    """A record's references as a list: ``reference`` is one image (path, bytes, image) or a list of them."""
    value = record.get("reference")
    if isinstance(value, (list, tuple)):
        return list(value)
    return [] if _empty(value) else [value]


def reference_where(name: str, k: int, n: int) -> str:
    """Where reference ``k`` (0-based) of ``n`` is, for messages: ``field 'reference'``, or ``[k]`` of a list."""
    return f"{name}, field 'reference'" + (f" [{k}]" if n > 1 else "")


def record_name(record: dict, index: int) -> str:
    rid = record.get("id")
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def check_record(record: dict, index: int, base_dir: str | None, alpha_background: str = "white") -> tuple:
    """``(h, w, rh, rw)`` of the draft and reference (of the image twice for a mask-guided task record); a
    :class:`RecordError` if the record cannot be trained on."""
    name = record_name(record, index)
    if not _empty(record.get("task")):
        return _check_task_record(record, name, base_dir, alpha_background)
    refs = references(record)
    for key in REQUIRED_FIELDS:
        if _empty(record.get(key)) or (key == "reference" and not refs):
            raise RecordError(f"{name}: missing field {key!r}")
    if not isinstance(record["prompt"], str):
        raise RecordError(f"{name}, field 'prompt': expected text, got {type(record['prompt']).__name__}")
    sizes = {}
    for key in IMAGE_FIELDS:
        if key == "reference":  # each of several references on its own; the first one's size is kept
            for k, ref in enumerate(refs):
                where = reference_where(name, k, len(refs))
                if _empty(ref):
                    raise RecordError(f"{where}: empty (give an image path or image)")
                sizes.setdefault(key, _image_size({key: ref}, key, name, base_dir, alpha_background, where))
        elif not _empty(record.get(key)):
            sizes[key] = _image_size(record, key, name, base_dir, alpha_background)
    base = sizes["target"]
    for key in ("draft", "mask"):
        if key in sizes and sizes[key] != base:
            raise RecordError(
                f"{name}: size mismatch: {key!r} is {sizes[key][0]}x{sizes[key][1]} but 'target' is {base[0]}x{base[1]} "
                "(draft, target and mask must have the same size; the reference may differ)"
            )
    (w, h), (rw, rh) = sizes["draft"], sizes["reference"]
    return h, w, rh, rw


def _image_size(
    record: dict, key: str, name: str, base_dir: str | None, alpha_background: str, where: str | None = None
) -> tuple[int, int]:
    """``(w, h)`` of the record's image field ``key``, decoded to check it; a RecordError naming the record and field
    (an empty mask too)."""
    try:
        img = load_image(
            record[key],
            base_dir=base_dir,
            where=where or f"{name}, field {key!r}",
            mask=key == "mask",
            alpha_background=alpha_background,
        )
    except RecordError:
        raise
    except DataError as e:
        raise RecordError(str(e)) from e
    if key == "mask" and img.getextrema()[1] < 128:
        raise RecordError(
            f"{name}, field 'mask': the mask is empty (no pixel >= 128); drop the record or give a region"
        )
    return img.size


def _check_task_record(record: dict, name: str, base_dir: str | None, alpha_background: str) -> tuple:
    """A mask-guided task record: ``image`` always; ``mask`` for fill and removal (extend builds it from ``margin``);
    a text ``prompt`` for fill; ``target`` optional (SFT and pixel metrics need it); sizes equal."""
    task = record["task"]
    if task not in MASK_TASKS:
        raise RecordError(f"{name}, field 'task': {task!r} is not one of {', '.join(MASK_TASKS)}")
    needed = ["image"] + (["mask"] if task != "extend" else []) + (["prompt"] if task == "fill" else [])
    for key in needed:
        if _empty(record.get(key)):
            raise RecordError(f"{name}: a {task!r} record needs field {key!r}")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RecordError(f"{name}, field 'prompt': expected text, got {type(prompt).__name__}")
    margin = record.get("margin", DEFAULT_EXTEND_MARGIN)
    if task == "extend" and (not isinstance(margin, (int, float)) or not 0 < margin < 0.5):
        raise RecordError(f"{name}, field 'margin': the extend band must be a fraction in (0, 0.5), got {margin!r}")
    sizes = {}
    for key in ("image", "mask", "target"):
        if _empty(record.get(key)):
            continue
        sizes[key] = _image_size(record, key, name, base_dir, alpha_background)
        if sizes[key] != sizes["image"]:
            raise RecordError(
                f"{name}: size mismatch: {key!r} is {sizes[key][0]}x{sizes[key][1]} but 'image' is "
                f"{sizes['image'][0]}x{sizes['image'][1]} (image, mask and target must have the same size)"
            )
    w, h = sizes["image"]
    return h, w, h, w


def _validate_row(row: dict, index: int, *, base_dir, name, jsonl, alpha_background) -> dict:
    try:
        record = parse_jsonl_row(row, name) if jsonl else row
        h, w, rh, rw = check_record(record, index, base_dir, alpha_background)
    except DataError as e:
        return {"_error": str(e), "_h": -1, "_w": -1, "_rh": -1, "_rw": -1, "_has": 0, "_nref": 0}
    has = sum(1 << i for i, k in enumerate(OPTIONAL_FIELDS) if not _empty(record.get(k)))
    nref = 0 if not _empty(record.get("task")) else len(references(record))
    return {"_error": None, "_h": h, "_w": w, "_rh": rh, "_rw": rw, "_has": has, "_nref": nref}


@dataclass
class ValidationReport:
    """``kept`` records, the messages of the ``skipped`` ones, and whether the pass came from the cache."""

    kept: int
    skipped: list[str] = field(default_factory=list)
    cached: bool = False


@dataclass
class Validated:
    """Per kept record: its row in the source (``rows``), sizes ``[n, 4]`` (h, w, rh, rw; of the first reference),
    optional-field bits, and the number of references (``nrefs``; 0 for a task record, -1 when not validated)."""

    rows: np.ndarray
    sizes: np.ndarray
    has: np.ndarray
    report: ValidationReport
    nrefs: np.ndarray | None = None


def _cache_file(ds: datasets.Dataset, fingerprint: str) -> str | None:
    if not ds.cache_files or not datasets.is_caching_enabled():
        return None
    return os.path.join(os.path.dirname(ds.cache_files[0]["filename"]), f"refiner-rl-validation-{fingerprint}.arrow")


def validate_records(
    source: RecordSource, *, skip_invalid: bool = False, alpha_background: str = "white", num_proc: int | None = None
) -> Validated:
    """Check every record of ``source`` (module docstring) in one pass; raise the first error (with the count of the
    others), or with ``skip_invalid`` skip and count bad records (named in one warning, up to :data:`SHOWN_SKIPS`)."""
    ds = source.dataset
    settings = dict(base_dir=source.base_dir, name=source.name, jsonl=source.jsonl, alpha_background=alpha_background)
    fingerprint = Hasher.hash([ds._fingerprint, settings, VALIDATION_FORMAT])
    cache_file = _cache_file(ds, fingerprint)
    cached = cache_file is not None and bool(glob.glob(os.path.splitext(cache_file)[0] + "*.arrow"))
    result = ds.map(
        _validate_row,
        with_indices=True,
        fn_kwargs=settings,
        remove_columns=ds.column_names,
        features=_FEATURES,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc=f"validating {source.name}",
    )
    table = result.data.table
    errors = table.column("_error")
    bad = np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False))
    if len(bad) and not skip_invalid:
        more = f" ({len(bad) - 1} more invalid record(s) after it)" if len(bad) > 1 else ""
        raise RecordError(f"{errors[int(bad[0])].as_py()}{more}; skip_invalid_records skips and counts bad records")
    skipped = [errors[int(i)].as_py() for i in bad]
    rows = np.flatnonzero(errors.is_null().to_numpy(zero_copy_only=False))
    sizes = np.stack([table.column(k).to_numpy()[rows] for k in ("_h", "_w", "_rh", "_rw")], axis=1)
    has = table.column("_has").to_numpy()[rows]
    nrefs = table.column("_nref").to_numpy()[rows]
    if skipped:
        shown = "\n  ".join(skipped[:SHOWN_SKIPS])
        more = f"\n  and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
        logger.warning(
            "%s: skipped %d invalid record(s) of %d:\n  %s%s", source.name, len(skipped), len(ds), shown, more
        )
    if not len(rows):
        raise RecordError(f"{source.name}: no valid record left after validation")
    logger.info("%s: %d records (%d skipped)%s", source.name, len(rows), len(skipped), " [cached]" if cached else "")
    return Validated(rows, sizes, has, ValidationReport(len(rows), skipped, cached), nrefs)
