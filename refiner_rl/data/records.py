"""Triplet records: (prompt, draft, reference, target, mask) as a lazy torch dataset, and their batching.

Records stay undecoded in a ``datasets.Dataset`` (:mod:`refiner_rl.data.sources`), are validated once in a
cached streaming pass (:mod:`refiner_rl.data.validation`), and each item's images are decoded only when the item
is read (:mod:`refiner_rl.data.images`), so memory does not grow with the number of records and DataLoader
workers decode ahead of the training step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from refiner_rl.data.images import check_alpha_background, header_size, load_image, to_tensor
from refiner_rl.data.registration import RegistrationCache, register_reference, warp_reference
from refiner_rl.data.sources import load_records, parse_jsonl_row
from refiner_rl.data.validation import (
    DEFAULT_EXTEND_MARGIN,
    OPTIONAL_FIELDS,
    REMOVAL_PROMPT,
    RecordError,
    Validated,
    ValidationReport,
    record_name,
    reference_where,
    references,
    validate_records,
)
from refiner_rl.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "BucketBatchOrderSampler",
    "RecordError",
    "TripletDataset",
    "collate_triplets",
    "fit_size",
    "load_records",
    "nearest_bucket",
    "reference_columns",
    "validate_records",
]
ITEM_FIELDS = ("prompt", "index", "draft", "mask")  # every item has these (and a triplet's its reference)
ReferenceAlignment = Literal["none", "register"]
REFERENCE_ALIGNMENTS = get_args(ReferenceAlignment)


def fit_size(height: int, width: int, resolution: int | None, multiple: int) -> tuple[int, int]:
    """Size with about ``resolution**2`` pixels, the same aspect ratio, both sides multiples of ``multiple``.
    ``resolution=None`` keeps the area and only rounds to the multiple."""
    scale = 1.0 if not resolution else (resolution * resolution / float(height * width)) ** 0.5
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def reference_columns(columns: dict) -> list[str]:
    """The reference columns of an item or a batch, in order: ``reference`` (the first reference), then
    ``reference_2``, ``reference_3``, ... for records with several; none for mask-guided task records."""
    if columns.get("reference") is None:
        return []
    out = ["reference"]
    while columns.get(f"reference_{len(out) + 1}") is not None:
        out.append(f"reference_{len(out) + 1}")
    return out


def nearest_bucket(height: int, width: int, buckets: list[int]) -> int:
    """The bucket (a side length) closest to the image's own size, ``sqrt(H W)``."""
    side = (height * width) ** 0.5
    return min(buckets, key=lambda b: abs(b - side))


class TripletDataset(Dataset):
    """Validated triplet records, decoded one item at a time.

    Items: ``prompt`` (str), ``draft``/``target`` ``[3, H, W]``, ``reference`` ``[3, Hr, Wr]`` (a record whose
    ``reference`` is a list of N images: the first, and ``reference_2`` ... ``reference_N`` the others, each resized
    and registered on its own; :func:`reference_columns`), ``mask``
    ``[1, H, W]`` (all ones when the record has none), ``index`` (int), and ``prompt_embeds`` /
    ``pooled_prompt_embeds`` when the record carries precomputed text embeddings. Pixel values are in [0, 1],
    decoded from any image mode to 8-bit RGB (``alpha_background`` says how transparency is flattened).
    Images are resized to ``resolution`` (or the nearest of ``buckets``), sides multiples of ``multiple``.

    ``records``: a list of record dicts, a ``datasets.Dataset``, or a :class:`RecordSource` from
    :func:`load_records`; ``num_proc`` processes validate them (:func:`validate_records`).
    """

    def __init__(
        self,
        records: list[dict] | Any,
        base_dir: str | None = None,
        *,
        resolution: int | None = None,
        buckets: list[int] | None = None,
        multiple: int = 16,
        validate: bool = True,
        skip_invalid: bool = False,
        alpha_background: str = "white",
        num_proc: int | None = None,
        reference_alignment: str = "none",
        registration: dict | None = None,
    ):
        if reference_alignment not in REFERENCE_ALIGNMENTS:
            raise ConfigError(
                f"reference_alignment {reference_alignment!r} is not one of {', '.join(REFERENCE_ALIGNMENTS)}"
            )
        self.reference_alignment, self.registration = reference_alignment, dict(registration or {})
        self._transforms: dict[int, tuple[float, float, float, float]] = {}
        self._extra_transforms: dict[int, list[tuple[float, float, float, float]]] = {}  # references 2..N
        source = load_records(records)
        if base_dir is not None:
            source = dataclasses.replace(source, base_dir=base_dir)
        self.source, self.alpha_background = source, check_alpha_background(alpha_background)
        if validate:
            v = validate_records(
                source, skip_invalid=skip_invalid, alpha_background=alpha_background, num_proc=num_proc
            )
        else:
            n = len(source.dataset)
            v = Validated(np.arange(n), np.full((n, 4), -1), np.full(n, -1), ValidationReport(n))
        self._rows, self._sizes, self._has, self.report = v.rows, v.sizes, v.has, v.report
        self._nrefs = v.nrefs if v.nrefs is not None else np.full(len(v.rows), -1)
        self.resolution, self.buckets, self.multiple = resolution, sorted(buckets) if buckets else None, multiple
        if validate and len(self):
            tasks = (self._has >> OPTIONAL_FIELDS.index("task")) & 1
            if tasks.min() != tasks.max():
                raise DataError(
                    f"{source.name} mixes triplet records (draft, reference, target) with mask-guided task records "
                    "(task, image, mask): train an editor on one kind at a time"
                )
        if reference_alignment == "register" and len(self) and self.has_field("task"):
            raise ConfigError("reference_alignment: register needs references; mask-guided task records have none")

    @classmethod
    def from_source(
        cls, source: Any, *, split: str = "train", cache_dir: str | None = None, **kwargs
    ) -> TripletDataset:
        """Load ``source`` (a file, folder, ``datasets`` name or object; see :func:`load_records`) and validate it."""
        return cls(load_records(source, split=split, cache_dir=cache_dir), **kwargs)

    @property
    def base_dir(self) -> str | None:
        return self.source.base_dir

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> dict:
        """The raw record of item ``index`` (image fields as paths, bytes or ``datasets`` image dicts)."""
        row = self.source.dataset[int(self._rows[index])]
        return parse_jsonl_row(row, self.source.name) if self.source.jsonl else row

    def has_field(self, name: str) -> bool:
        """Whether every item carries ``name`` (``target``, ``prompt_embeds``, ... or an always-present field)."""
        if name in ITEM_FIELDS:
            return True
        if name not in OPTIONAL_FIELDS or not len(self):
            return False
        if self._has[0] < 0:  # not validated: look at the records
            return all(self.record(i).get(name) not in (None, "") for i in range(len(self)))
        bit = 1 << OPTIONAL_FIELDS.index(name)
        return bool(np.all(self._has & bit))

    def num_references(self, index: int) -> int:
        """How many references item ``index`` has (0 for a mask-guided task record)."""
        n = int(self._nrefs[index])
        if n < 0:  # not validated: look at the record
            r = self.record(index)
            n = 0 if r.get("task") not in (None, "") else len(references(r))
        return n

    def check_references(self, max_references: int | None, editor: str) -> None:
        """A :class:`DataError` naming the first record with more than ``max_references`` references (None: any
        number), which ``editor`` cannot take."""
        if max_references is None:
            return
        for i in range(len(self)):
            n = self.num_references(i)
            if n > max_references:
                raise DataError(
                    f"{record_name(self.record(i), i)}: {n} references, but {editor} takes "
                    f"{'one' if max_references == 1 else max_references}; give that record a single reference or "
                    "train an editor that takes several (Qwen-Image-Edit Plus)"
                )

    def _image(self, record: dict, index: int, key: str, mask: bool = False, value=None, where=None) -> Image.Image:
        return load_image(
            record[key] if value is None else value,
            base_dir=self.base_dir,
            where=where or f"{record_name(record, index)}, field {key!r}",
            mask=mask,
            alpha_background=self.alpha_background,
        )

    def _size(self, w: int, h: int) -> tuple[int, int]:
        res = nearest_bucket(h, w, self.buckets) if self.buckets else self.resolution
        return fit_size(h, w, res, self.multiple)

    def __getitem__(self, index: int) -> dict:
        item = self._decode(index)
        if self.reference_alignment == "register":
            item["reference"] = self.align_reference(index, item)
            for k, key in enumerate(reference_columns(item)[1:], 1):
                item[key] = self._align(item, key, self._extra_transform(index, item, k))
        return item

    def _decode(self, index: int) -> dict:
        r = self.record(index)
        if r.get("task") not in (None, ""):
            return self._decode_task(r, index)
        draft = self._image(r, index, "draft")
        h, w = self._size(*draft.size)
        refs = references(r)
        name = record_name(r, index)
        refs = [
            self._image(r, index, "reference", value=v, where=reference_where(name, k, len(refs)))
            for k, v in enumerate(refs)
        ]
        item = {"prompt": r["prompt"], "index": index, "draft": to_tensor(draft.resize((w, h), Image.BICUBIC))}
        for k, ref in enumerate(refs):
            rh, rw = self._size(*ref.size)
            item["reference" if k == 0 else f"reference_{k + 1}"] = to_tensor(ref.resize((rw, rh), Image.BICUBIC))
        if r.get("target") not in (None, ""):
            item["target"] = to_tensor(self._image(r, index, "target").resize((w, h), Image.BICUBIC))
        if r.get("mask") not in (None, ""):
            m = to_tensor(self._image(r, index, "mask", mask=True).resize((w, h), Image.NEAREST))
            item["mask"] = (m >= 0.5).float()
        else:
            item["mask"] = torch.ones(1, h, w)
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            if r.get(key) is not None:
                item[key] = torch.as_tensor(r[key], dtype=torch.float32)
        return item

    def _decode_task(self, r: dict, index: int) -> dict:
        """A mask-guided task record as an item: ``draft`` is the image to edit; an ``extend`` record's mask is the
        border band of width ``margin`` (a fraction of each side) unless it gives its own; removal's prompt is
        fixed."""
        image = self._image(r, index, "image")
        h, w = self._size(*image.size)
        task = r["task"]
        if task == "removal":
            prompt = REMOVAL_PROMPT
        else:
            prompt = r.get("prompt") or ""
        item = {"prompt": prompt, "index": index, "task": task, "draft": to_tensor(image.resize((w, h), Image.BICUBIC))}
        if r.get("mask") not in (None, ""):
            m = to_tensor(self._image(r, index, "mask", mask=True).resize((w, h), Image.NEAREST))
            item["mask"] = (m >= 0.5).float()
        else:
            item["mask"] = extend_mask(h, w, r.get("margin") or DEFAULT_EXTEND_MARGIN)
        if r.get("target") not in (None, ""):
            item["target"] = to_tensor(self._image(r, index, "target").resize((w, h), Image.BICUBIC))
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            if r.get(key) is not None:
                item[key] = torch.as_tensor(r[key], dtype=torch.float32)
        return item

    def register_references(
        self, progress: bool = True, num_workers: int | None = None, cache_dir: str | None = None
    ) -> None:
        """Find the registration of every item not registered yet (``reference_alignment: register``), with a
        progress bar, so training steps and DataLoader workers (which inherit the found transforms) do not pay for
        it. ``num_workers`` DataLoader worker processes share the work (default: one per CPU core when there are at
        least 64 items); each registers on one thread, so the transforms do not depend on the run's thread settings
        or on the number of workers. With ``cache_dir``, registrations found before for the same images and settings
        are read from it and new ones are added to it (:class:`~refiner_rl.data.registration.RegistrationCache`)."""
        from tqdm.auto import tqdm

        todo = [i for i in range(len(self)) if i not in self._transforms]
        cache = RegistrationCache(cache_dir) if cache_dir else None
        known = cache.load() if cache and todo else {}
        if num_workers is None:
            num_workers = min(os.cpu_count() or 1, 8) if len(todo) >= 64 else 0
        loader = torch.utils.data.DataLoader(
            _Registrations(self, todo, known), batch_size=None, num_workers=num_workers
        )
        found, hits = {}, 0
        for i, key, transforms, cached in tqdm(
            loader, total=len(todo), desc="registering references", disable=not progress
        ):
            first, *rest = (tuple(float(v) for v in t) for t in transforms)
            self._transforms[int(i)] = first
            if rest:
                self._extra_transforms[int(i)] = rest
            hits += bool(cached)
            if not cached:
                found[key] = [first, *rest]
        if cache is not None:
            cache.add(found)
            if hits:
                logger.info("registration: %d of %d items read from %s", hits, len(todo), cache.path)

    def _register(self, item: dict, key: str = "reference") -> tuple[float, float, float, float]:
        return register_reference(item["draft"], item[key], item["mask"], **self.registration)

    def _extra_transform(self, index: int, item: dict, k: int) -> tuple[float, float, float, float]:
        """The registration of reference ``k + 1`` (1-based ``k``: ``reference_{k + 1}``), found once and kept."""
        if index not in self._extra_transforms:
            self._extra_transforms[index] = [self._register(item, key) for key in reference_columns(item)[1:]]
        return self._extra_transforms[index][k - 1]

    def _align(self, item: dict, key: str, transform) -> torch.Tensor:
        s, ox, oy, _ = transform
        return warp_reference(item[key], (s, ox, oy), tuple(item["draft"].shape[-2:]), "bilinear").clamp(0, 1)

    def align_reference(self, index: int, item: dict) -> torch.Tensor:
        """Item ``index``'s reference registered to its draft inside the mask and warped into the draft's frame
        (:mod:`refiner_rl.data.registration`); the transform is found once per item and kept
        (``reference_transforms``)."""
        if index not in self._transforms:
            self._transforms[index] = self._register(item)
        return self._align(item, "reference", self._transforms[index])

    @property
    def reference_transforms(self) -> dict[int, tuple[float, float, float, float]]:
        """``{index: (s, ox, oy, cost)}`` of the items registered so far (``reference_alignment: register``): the
        reference pixel ``s * (x + 0.5) + o`` shows draft pixel ``x``; ``cost`` is the match's mean squared
        difference. Of the first reference; :attr:`extra_reference_transforms` holds the others'."""
        return dict(self._transforms)

    @property
    def extra_reference_transforms(self) -> dict[int, list[tuple[float, float, float, float]]]:
        """``{index: [transform of reference 2, ..., of reference N]}`` of the registered items with several."""
        return {i: list(t) for i, t in self._extra_transforms.items()}

    def with_reference_alignment(self, alignment: str, registration: dict | None = None) -> TripletDataset:
        """This dataset serving references with ``alignment`` (``none`` or ``register``): itself when it already
        does, else a shallow copy over the same records (registered at once, without a progress bar)."""
        if alignment not in REFERENCE_ALIGNMENTS:
            raise ConfigError(f"reference_alignment {alignment!r} is not one of {', '.join(REFERENCE_ALIGNMENTS)}")
        if alignment == self.reference_alignment and (not registration or dict(registration) == self.registration):
            return self
        out = copy.copy(self)
        out.reference_alignment, out._transforms, out._extra_transforms = alignment, {}, {}
        out.registration = dict(registration or self.registration)
        if alignment == "register":
            out.register_references(progress=False)
        return out

    def bucket_of(self, index: int) -> tuple[int, int, int, int]:
        """(H, W, Hr, Wr) after resizing, the key of a size bucket: from the sizes the validation pass stored, or
        (without validation) from the image headers."""
        h, w, rh, rw = (int(v) for v in self._sizes[index])
        if h < 0:
            r = self.record(index)
            name = record_name(r, index)
            keys = ("image", "image") if r.get("task") not in (None, "") else ("draft", "reference")
            w, h = header_size(r[keys[0]], base_dir=self.base_dir, where=f"{name}, field {keys[0]!r}")
            rw, rh = header_size(r[keys[1]], base_dir=self.base_dir, where=f"{name}, field {keys[1]!r}")
        n = self.num_references(index)
        if self.reference_alignment == "register":  # every reference is warped into the draft's frame
            return (*self._size(w, h),) * (1 + max(n, 1))
        extra = []
        if n > 1:  # several references: each one's size is part of the key (so is their number)
            r = self.record(index)
            name = record_name(r, index)
            for k, ref in enumerate(references(r)[1:], 1):
                ew, eh = header_size(ref, base_dir=self.base_dir, where=reference_where(name, k, n))
                extra += self._size(ew, eh)
        return (*self._size(w, h), *self._size(rw, rh), *extra)


class _Registrations(Dataset):
    """Item ``k``: ``(index, key, [(s, ox, oy, cost), ...], cached)``, the registrations of the N references of the
    dataset's item ``todo[k]``, read from ``known`` (by :meth:`RegistrationCache.key`) when there, else searched."""

    def __init__(self, dataset: TripletDataset, todo: list[int], known: dict | None = None):
        self.dataset, self.todo, self.known = dataset, todo, known or {}

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int):
        i = self.todo[k]
        item = self.dataset._decode(i)
        keys = reference_columns(item)
        key = RegistrationCache.key(item, keys, self.dataset.registration)
        if key in self.known:
            return i, key, self.known[key], True
        return i, key, [self.dataset._register(item, name) for name in keys], False


def extend_mask(height: int, width: int, margin: float) -> torch.Tensor:
    """``[1, H, W]`` mask of an ``extend`` (outpainting) record: 1 on the border band ``round(margin * side)`` wide
    on every side, 0 inside (the kept image)."""
    mh, mw = max(1, round(margin * height)), max(1, round(margin * width))
    mask = torch.ones(1, height, width)
    mask[:, mh : height - mh, mw : width - mw] = 0.0
    return mask


def condition_image(columns: dict, i: int | None = None) -> torch.Tensor:
    """What an item (or row ``i`` of a batch) is conditioned on besides its draft, as ``[3, H, W]`` for grids and
    tables: the reference, or the mask in grey for records without one (mask-guided tasks)."""
    pick = (lambda k: columns[k]) if i is None else (lambda k: columns[k][i])
    if columns.get("reference") is not None:
        return pick("reference")
    return pick("mask").float().expand(3, -1, -1)


def collate_triplets(items: Iterable[dict]) -> dict:
    """Stack items of one size bucket into a batch; a clear error when sizes or numbers of references differ (a
    batch holds records with the same number of references: ``reference``, ``reference_2``, ...)."""
    items = list(items)
    out: dict[str, Any] = {
        "prompt": [it["prompt"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "task" in items[0]:
        out["task"] = [it.get("task") for it in items]
    counts = [len(reference_columns(it)) for it in items]
    if len(set(counts)) > 1:
        raise DataError(
            f"records {[it['index'] for it in items]} have {counts} references in one batch: a batch holds records "
            "with the same number of references; use `buckets` (batches are then drawn per bucket) or "
            "per_device_train_batch_size 1"
        )
    extra = reference_columns(items[0])[1:]
    for key in ("draft", "reference", *extra, "target", "mask", "prompt_embeds", "pooled_prompt_embeds"):
        if key not in items[0]:
            continue
        shapes = {tuple(it[key].shape) for it in items}
        if len(shapes) > 1:
            raise DataError(
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
