"""Stage 1, ingest: clean source images -> decoded, size-checked, bucketed, de-duplicated images.

1. List the source: every image file of a folder (recursively, sorted), or the rows of a parquet file or a saved
   ``datasets`` folder (image column ``image_column``; optional ``id_column``, ``region_column``,
   ``reference_column``).
2. Per image (``map``, ``num_proc`` processes): decode it with :func:`refiner_rl.data.images.load_image` (a corrupt
   file or a mode that cannot become RGB is dropped as ``unreadable``), drop it as ``too_small`` when its shorter
   side is below ``min_size`` or it is smaller than the smallest bucket, resize it (Lanczos) to about ``b^2``
   pixels for the largest bucket ``b <= sqrt(H W)``, aspect kept, sides multiples of ``multiple``
   (:func:`refiner_rl.data.records.fit_size`), and hash it: the 64-bit perceptual hash (DCT of the 32x32
   grey image, bits = coefficients above their median; ``imagehash.phash``). A region box is scaled with the image,
   a region mask resized nearest.
3. De-duplicate: an image whose hash is within ``dedup_distance`` bits (Hamming) of an earlier kept image is
   dropped as ``duplicate``. Candidates are found by multi-index hashing: split the 64 bits into ``d + 1`` chunks;
   two hashes within ``d`` bits agree exactly on at least one chunk (pigeonhole), so only images sharing a chunk
   with it are compared.
"""

from __future__ import annotations

import json
import math
import os

import datasets
from datasets.fingerprint import Hasher
from PIL import Image

from refiner_rl.data.build.common import DROP, StageContext, dropped, kept, to_png
from refiner_rl.data.images import load_image
from refiner_rl.data.records import fit_size
from refiner_rl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
HASH_BITS = 64
FEATURES = datasets.Features(
    {
        "source_id": datasets.Value("string"),
        "image": datasets.Value("binary"),
        "phash": datasets.Value("string"),
        "region_box": datasets.Value("string"),  # JSON [x0, y0, x1, y1] in resized pixels, or ""
        "region_mask": datasets.Value("binary"),  # PNG, or empty
        "reference": datasets.Value("binary"),  # PNG of a user reference, or empty
        **DROP,
    }
)
EMPTY = {"source_id": "", "image": b"", "phash": "", "region_box": "", "region_mask": b"", "reference": b""}


def _saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json"))


def list_source(config) -> tuple[datasets.Dataset, str | None, str]:
    """``(rows, folder relative paths resolve against, fingerprint of the source's content)``. A folder gives rows
    ``{_id, image}`` with ``image`` a path; a table gives its own columns."""
    path = config.source
    if os.path.isdir(path) and not _saved_dataset(path):
        if config.region_column or config.reference_column:
            raise DataError(
                f"source {path!r} is an image folder, which has no columns: `region_column` and `reference_column` "
                "need a parquet file or a saved `datasets` folder"
            )
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            files += [os.path.relpath(os.path.join(root, n), path) for n in sorted(names)]
        files = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise DataError(f"source folder {path!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        stats = [(f, os.stat(os.path.join(path, f)).st_mtime_ns, os.path.getsize(os.path.join(path, f))) for f in files]
        ds = datasets.Dataset.from_dict({"_id": files, config.image_column: files})
        return ds, os.path.abspath(path), Hasher.hash(stats)
    if os.path.isdir(path):
        ds, fingerprint = datasets.load_from_disk(path), None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"source {path!r} is a DatasetDict with splits {list(ds)}; save one split as the source")
        fingerprint = ds._fingerprint
    elif path.endswith(".parquet") and os.path.isfile(path):
        try:
            ds = datasets.Dataset.from_parquet(path, keep_in_memory=True)
        except Exception as e:  # a corrupt or non-parquet file
            raise DataError(f"source {path}: cannot be read as parquet ({type(e).__name__}: {e})") from e
        st = os.stat(path)
        fingerprint = Hasher.hash([os.path.abspath(path), st.st_mtime_ns, st.st_size])
    else:
        raise DataError(f"source {path!r} is not an image folder, a parquet file or a saved `datasets` folder")
    for key in ("image_column", "id_column", "region_column", "reference_column"):
        column = getattr(config, key)
        if column and column not in ds.column_names:
            raise DataError(f"source {path}: no column {column!r} (`{key}`); its columns are {ds.column_names}")
    for key, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(key, datasets.Image(decode=False))
    return ds, os.path.dirname(os.path.abspath(path)), fingerprint


def _region(value, img_size, new_size, *, base_dir, where) -> dict:
    """The region column's value moved to the resized image: a box (scaled) or a mask (resized nearest)."""
    (w, h), (nw, nh) = img_size, new_size
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        x0, y0, x1, y1 = (float(v) for v in value)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise DataError(f"{where}: region box {list(value)} is not inside the {w}x{h} image")
        sx, sy = nw / w, nh / h
        box = [math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy)]
        return {"region_box": json.dumps(box)}
    mask = load_image(value, base_dir=base_dir, where=f"{where}, region mask", mask=True)
    if mask.size != (w, h):
        raise DataError(f"{where}: region mask is {mask.size[0]}x{mask.size[1]} but the image is {w}x{h}")
    mask = mask.resize((nw, nh), Image.NEAREST)
    if mask.getextrema()[1] < 128:
        raise DataError(f"{where}: region mask is empty (no pixel >= 128)")
    return {"region_mask": to_png(mask)}


def _ingest_row(row: dict, index: int, *, base_dir, config) -> dict:
    source_id = str(row[config.id_column]) if config.id_column else row.get("_id") or f"row-{index}"
    where = f"source image {source_id!r}" + (f" ({os.path.join(base_dir, source_id)})" if "_id" in row else "")
    empty = dict(EMPTY, source_id=source_id)
    try:
        img = load_image(row[config.image_column], base_dir=base_dir, where=where)
    except DataError as e:
        return dropped("unreadable", str(e), empty)
    w, h = img.size
    fitting = [b for b in config.buckets if b <= math.sqrt(w * h)]
    if min(w, h) < config.min_size or not fitting:
        why = f"{where}: {w}x{h} is below min_size {config.min_size} or the smallest bucket {config.buckets[0]}"
        return dropped("too_small", why, empty)
    nh, nw = fit_size(h, w, fitting[-1], config.multiple)
    resized = img.resize((nw, nh), Image.LANCZOS)
    import imagehash

    out = dict(empty, image=to_png(resized), phash=str(imagehash.phash(resized, hash_size=8)))
    try:
        if config.region_column and row.get(config.region_column) is not None:
            out.update(_region(row[config.region_column], (w, h), (nw, nh), base_dir=base_dir, where=where))
        if config.reference_column and row.get(config.reference_column) is not None:
            ref = load_image(row[config.reference_column], base_dir=base_dir, where=f"{where}, reference")
            out["reference"] = to_png(ref)
    except DataError as e:
        return dropped("bad_column", str(e), empty)
    return kept(out)


def near_duplicates(hashes: list[int], distance: int, bits: int = HASH_BITS) -> list[int]:
    """For each hash, the index of an earlier kept hash within ``distance`` bits (Hamming), or -1 (it is kept).
    Multi-index hashing (module docstring) keeps this near-linear instead of comparing all pairs."""
    if distance < 0:
        return [-1] * len(hashes)
    parts = min(distance + 1, bits)
    edges = [round(i * bits / parts) for i in range(parts + 1)]
    chunks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
    tables: list[dict[int, list[int]]] = [{} for _ in chunks]
    out = []
    for i, h in enumerate(hashes):
        keys = [(h >> lo) & m for lo, m in chunks]
        candidates = {j for table, k in zip(tables, keys) for j in table.get(k, ())}
        match = min((j for j in candidates if bin(h ^ hashes[j]).count("1") <= distance), default=-1)
        out.append(match)
        if match < 0:
            for table, k in zip(tables, keys):
                table.setdefault(k, []).append(i)
    return out


def ingest(_, config, ctx: StageContext) -> datasets.Dataset:
    """Stage 1 (module docstring): every source row, with ``_drop`` set on the rows that are not kept."""
    ds, base_dir, _ = list_source(config)
    ds = ctx.map(
        ds,
        _ingest_row,
        step="decode, resize, hash",
        num_proc=config.num_proc,
        with_indices=True,
        fn_kwargs={"base_dir": base_dir, "config": config},
        remove_columns=ds.column_names,
        features=FEATURES,
    )
    drops, hashes, whys, ids = (list(ds[k]) for k in ("_drop", "phash", "_why", "source_id"))
    live = [i for i, d in enumerate(drops) if not d]
    match = near_duplicates([int(hashes[i], 16) for i in live], config.dedup_distance)
    for i, m in zip(live, match):
        if m >= 0:
            drops[i] = "duplicate"
            whys[i] = (
                f"source image {ids[i]!r} duplicates {ids[live[m]]!r} (perceptual hashes within {config.dedup_distance} bits)"
            )
    return ds.remove_columns(["_drop", "_why"]).add_column("_drop", drops).add_column("_why", whys)


def source_fingerprint(config) -> str:
    """A fingerprint of the source's content (file names, sizes, modification times; or the dataset's own)."""
    return list_source(config)[2]
