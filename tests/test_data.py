"""Triplet loading, validation and decoding: every bad input gets an error naming the record and the field."""

import json
import logging
import os
import pickle
import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl.configs import DataArguments
from refiner_rl.data import RecordError, TripletDataset, collate_triplets, decode_image, write_synthetic_dataset
from refiner_rl.data.synthetic import synthetic_records
from refiner_rl.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    """Arrow files and cached validations of each test go to its own folder, never the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _write(tmp_path, n=3, size=32):
    path = write_synthetic_dataset(str(tmp_path), n, seed=0, size=size)
    return path, [json.loads(line) for line in open(path)]


def _rewrite(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_folder_loads_and_batches(tmp_path):
    path, _ = _write(tmp_path)
    ds = TripletDataset.from_source(str(tmp_path), multiple=4)
    assert len(ds) == 3
    b = collate_triplets([ds[0], ds[1]])
    assert b["draft"].shape == (2, 3, 32, 32) and b["mask"].shape == (2, 1, 32, 32)
    assert set(b["mask"].unique().tolist()) <= {0.0, 1.0} and b["mask"].sum() > 0
    ds2 = TripletDataset.from_source(path, multiple=4)
    assert torch.equal(ds2[2]["target"], ds[2]["target"])


def test_parquet_with_image_bytes(tmp_path):
    import datasets

    _, rows = _write(tmp_path)
    table = {k: [] for k in ("prompt", "draft", "reference", "target", "mask")}
    for r in rows:
        table["prompt"].append(r["prompt"])
        for k in ("draft", "reference", "target", "mask"):
            table[k].append({"bytes": open(tmp_path / r[k], "rb").read(), "path": None})
    feats = datasets.Features(
        {"prompt": datasets.Value("string"), **{k: datasets.Image() for k in ("draft", "reference", "target", "mask")}}
    )
    datasets.Dataset.from_dict(table, features=feats).to_parquet(str(tmp_path / "t.parquet"))
    ds = TripletDataset.from_source(str(tmp_path / "t.parquet"), multiple=4)
    assert len(ds) == 3 and ds[1]["reference"].shape == (3, 32, 32)
    # and an in-memory datasets.Dataset
    ds3 = TripletDataset.from_source(datasets.Dataset.from_dict(table, features=feats), multiple=4)
    assert torch.allclose(ds3[0]["draft"], ds[0]["draft"])


def test_missing_file_names_record_and_field(tmp_path):
    path, rows = _write(tmp_path)
    rows[1]["reference"] = "nope.png"
    _rewrite(path, rows)
    with pytest.raises(RecordError, match=r"record 1 \(id='syn-0-1'\), field 'reference': file not found"):
        TripletDataset.from_source(path)


def test_corrupt_image_is_named(tmp_path):
    path, rows = _write(tmp_path)
    (tmp_path / rows[2]["draft"]).write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(RecordError, match=r"record 2 .*field 'draft': unreadable image"):
        TripletDataset.from_source(path)


def test_size_mismatch_is_named(tmp_path):
    path, rows = _write(tmp_path)
    Image.new("L", (16, 16), 255).save(tmp_path / rows[0]["mask"])
    with pytest.raises(RecordError, match=r"record 0 .*size mismatch: 'mask' is 16x16 but 'target' is 32x32"):
        TripletDataset.from_source(path)


def test_empty_mask_is_named(tmp_path):
    path, rows = _write(tmp_path)
    Image.new("L", (32, 32), 0).save(tmp_path / rows[1]["mask"])
    with pytest.raises(RecordError, match=r"record 1 .*field 'mask': the mask is empty"):
        TripletDataset.from_source(path)


def test_missing_field_and_bad_json(tmp_path):
    path, rows = _write(tmp_path)
    del rows[0]["draft"]
    _rewrite(path, rows)
    with pytest.raises(RecordError, match=r"record 0 .*missing field 'draft'"):
        TripletDataset.from_source(path)
    (tmp_path / "bad.jsonl").write_text("\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        TripletDataset.from_source(str(tmp_path / "bad.jsonl"))


def test_skip_invalid_counts_instead_of_failing(tmp_path):
    path, rows = _write(tmp_path, n=4)
    Image.new("L", (32, 32), 0).save(tmp_path / rows[3]["mask"])
    ds = TripletDataset.from_source(path, skip_invalid=True)
    assert len(ds) == 3 and len(ds.report.skipped) == 1 and "record 3" in ds.report.skipped[0]


def test_mixed_sizes_in_one_batch_is_a_clear_error_and_buckets_fix_it():
    recs = synthetic_records(4, size=32) + synthetic_records(4, seed=5, size=48)
    ds = TripletDataset(recs, multiple=16)
    with pytest.raises(DataError, match="different 'draft' sizes"):
        collate_triplets([ds[0], ds[5]])
    from refiner_rl.data import BucketBatchOrderSampler

    bucketed = TripletDataset(recs, multiple=16, buckets=[32, 48])
    unchecked = TripletDataset(recs, multiple=16, buckets=[32, 48], validate=False)  # sizes from image headers
    assert [unchecked.bucket_of(i) for i in (0, 5)] == [bucketed.bucket_of(i) for i in (0, 5)] == [(32,) * 4, (48,) * 4]
    order = list(BucketBatchOrderSampler(bucketed, batch_size=2, seed=0))
    assert len(order) == 8
    for i in range(0, 8, 2):
        collate_triplets([bucketed[order[i]], bucketed[order[i + 1]]])  # never mixes sizes


def test_resolution_keeps_aspect_and_multiple():
    recs = synthetic_records(1, size=32)
    ds = TripletDataset(recs, resolution=64, multiple=16)
    assert ds[0]["draft"].shape == (3, 64, 64) and ds[0]["mask"].shape == (1, 64, 64)


# ------------------------------------------------------------------------------------------------ JSONL lines


def test_json_array_line_names_file_and_line_and_is_skipped(tmp_path, caplog):
    path, rows = _write(tmp_path, n=2)
    with open(path, "a") as f:
        f.write("[1, 2, 3]\n\n{oops\n")  # lines 3 and 5 (line 4 is blank)
    with pytest.raises(
        DataError, match=r"records\.jsonl: line 3 is a JSON list, not an object; each .* \(1 more invalid"
    ):
        TripletDataset.from_source(path, multiple=4)
    with caplog.at_level(logging.INFO, logger="refiner_rl.data"):
        ds = TripletDataset.from_source(path, multiple=4, skip_invalid=True)
    assert len(ds) == 2 and ds.report.kept == 2 and len(ds.report.skipped) == 2
    assert "line 3 is a JSON list" in ds.report.skipped[0] and "line 5 is not valid JSON" in ds.report.skipped[1]
    text = caplog.text
    assert "skipped 2 invalid record(s) of 4" in text and "line 3" in text and "line 5" in text
    assert "2 records (2 skipped)" in text
    assert ds[1]["draft"].shape == (3, 32, 32)


def test_skip_warning_names_every_record_up_to_a_limit(tmp_path, caplog):
    path, _ = _write(tmp_path, n=1)
    with open(path, "a") as f:
        f.write("[]\n" * 12)
    with caplog.at_level(logging.WARNING, logger="refiner_rl.data"):
        ds = TripletDataset.from_source(path, multiple=4, skip_invalid=True)
    assert len(ds) == 1 and len(ds.report.skipped) == 12
    warning = caplog.text
    assert all(f"line {n} is a JSON list" in warning for n in range(2, 12)) and "line 12 " not in warning
    assert "and 2 more" in warning


# ------------------------------------------------------------------------------------------------ decoding


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for [H, W], RGB for [H, W, 3]) written by hand: Pillow cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _record(tmp_path, **images):
    """A record whose fields are files in ``tmp_path``: PIL images are saved as PNG, bytes written as they are."""
    rec = {"prompt": "p", "id": "r"}
    base = {"draft": Image.new("RGB", (8, 8), (10, 20, 30)), "reference": Image.new("RGB", (8, 8), (1, 2, 3))}
    for key, img in {**base, "target": base["draft"], **images}.items():
        path = str(tmp_path / f"{key}.png")
        img.save(path) if isinstance(img, Image.Image) else open(path, "wb").write(img)
        rec[key] = path
    return rec


def test_16bit_png_round_trip_keeps_values_to_1_over_255(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, size=(8, 8)).astype(np.uint16)
    grey[0, 0], grey[0, 1] = 0, 65535
    rgb = rng.integers(0, 65536, size=(8, 8, 3)).astype(np.uint16)
    rec = _record(tmp_path, draft=_png16(grey), target=_png16(grey), reference=_png16(rgb))
    assert Image.open(rec["draft"]).mode == "I;16"  # what made every pixel 1.0 before
    item = TripletDataset([rec], multiple=4)[0]
    want = torch.from_numpy(grey / 65535.0).float()
    assert item["draft"].shape == (3, 8, 8) and torch.equal(item["draft"][0], item["draft"][2])
    assert (item["draft"][1] - want).abs().max() <= 0.5 / 255 + 1e-6  # round(v / 257) / 255
    assert (item["target"][0] - want).abs().max() <= 0.5 / 255 + 1e-6
    want_rgb = torch.from_numpy(rgb / 65535.0).float().permute(2, 0, 1)
    assert (item["reference"] - want_rgb).abs().max() <= 1 / 255


def test_16bit_and_float_images_out_of_range_are_errors(tmp_path):
    dark = np.full((8, 8), 200, dtype=np.uint16)
    dark[0, 0] = 3
    with pytest.raises(RecordError, match=r"record 0 \(id='r'\), field 'target': 16-bit image whose values span only"):
        TripletDataset([_record(tmp_path, target=_png16(dark))], multiple=4)
    hot = Image.fromarray(np.full((4, 4), 1.5, dtype=np.float32), "F")
    with pytest.raises(DataError, match=r"float image values span \[1.5, 1.5\]; expected \[0, 1\]"):
        decode_image(hot)
    half = decode_image(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F"))
    assert half.mode == "RGB" and half.getpixel((0, 0)) == (128, 128, 128)


def test_palette_images_are_expanded(tmp_path):
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.putpixel((1, 1), 1)
    pal.putpixel((2, 2), 2)
    out = decode_image(pal)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (0, 0, 255)
    pal.info["transparency"] = 0  # palette entry 0 is transparent: composited on the background
    assert decode_image(pal).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(pal, alpha_background="black").getpixel((0, 0)) == (0, 0, 0)
    item = TripletDataset([_record(tmp_path, draft=pal, target=pal)], multiple=4)[0]
    assert item["draft"][:, 1, 1].tolist() == [1.0, 0.0, 0.0] and item["draft"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_rgba_is_composited_on_alpha_background_or_rejected(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 128))
    assert decode_image(rgba).getpixel((0, 0)) == (227, 177, 152)  # c a + 255 (1 - a), a = 128/255: 100.4 + 127
    assert decode_image(rgba, alpha_background="black").getpixel((0, 0)) == (100, 50, 25)
    assert decode_image(Image.new("RGBA", (2, 2), (9, 8, 7, 255)), alpha_background="error").getpixel((0, 0)) == (
        9,
        8,
        7,
    )  # an opaque alpha is dropped under any rule
    rec = _record(tmp_path, draft=rgba)
    with pytest.raises(RecordError, match=r"field 'draft': the image has transparent pixels and alpha_background"):
        TripletDataset([rec], multiple=4, alpha_background="error")
    item = TripletDataset([rec], multiple=4, alpha_background="black")[0]
    assert torch.allclose(item["draft"][:, 0, 0], torch.tensor([100, 50, 25]) / 255.0)
    with pytest.raises(ConfigError, match="alpha_background"):
        DataArguments(alpha_background="no-such-colour")


def test_masks_from_l_la_and_rgba_alpha(tmp_path):
    region = np.zeros((8, 8), dtype=np.uint8)
    region[2:6, 3:7] = 255
    la = Image.merge("LA", [Image.new("L", (8, 8), 255), Image.fromarray(region)])  # the alpha draws the region
    rgba = Image.merge("RGBA", [Image.new("L", (8, 8), 255)] * 3 + [Image.fromarray(region)])
    want = torch.from_numpy(region / 255.0).float()[None]
    for mask in (Image.fromarray(region, "L"), la, rgba, Image.fromarray(region.astype(np.uint16) * 257)):
        item = TripletDataset([_record(tmp_path, mask=mask)], multiple=4)[0]
        assert torch.equal(item["mask"], want), mask.mode
    empty = Image.merge("LA", [Image.new("L", (8, 8), 255), Image.new("L", (8, 8), 0)])  # white but transparent
    with pytest.raises(RecordError, match="field 'mask': the mask is empty"):
        TripletDataset([_record(tmp_path, mask=empty)], multiple=4)


# ------------------------------------------------------------------------------------------------ laziness, cache


def test_validation_is_cached_by_the_records_file(tmp_path, monkeypatch):
    path, rows = _write(tmp_path, n=3)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    first = TripletDataset.from_source(path, multiple=4)
    assert not first.report.cached and len(opened) == 12  # 3 records x 4 images, decoded once to validate
    cache = [f for f in os.listdir(os.path.dirname(first.source.dataset.cache_files[0]["filename"]))]
    assert sum(f.startswith("refiner-rl-validation-") for f in cache) == 1
    opened.clear()
    second = TripletDataset.from_source(path, multiple=4)
    assert second.report.cached and opened == [] and len(second) == 3
    assert second.bucket_of(2) == (32, 32, 32, 32) and opened == []  # sizes come from the cached pass
    other = TripletDataset.from_source(path, multiple=4, alpha_background="black")  # other settings: validated anew
    assert not other.report.cached
    rows[0]["prompt"] = "another prompt"
    _rewrite(path, rows)  # a changed records file is read and validated anew
    opened.clear()
    third = TripletDataset.from_source(path, multiple=4)
    assert not third.report.cached and len(opened) == 12 and third[0]["prompt"] == "another prompt"


def test_items_decode_only_their_own_files(tmp_path, monkeypatch):
    path, rows = _write(tmp_path, n=4)
    TripletDataset.from_source(path, multiple=4)  # fills the validation cache
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, *a, **k: opened.append(os.path.basename(fp)) or real_open(fp, *a, **k)
    )
    ds = TripletDataset.from_source(path, multiple=4)
    assert opened == [] and len(pickle.dumps(ds)) < 20_000  # workers get the memory-mapped table, not the images
    item = ds[2]
    assert sorted(opened) == sorted(rows[2][k] for k in ("draft", "reference", "target", "mask"))
    assert item["index"] == 2 and ds.has_field("target") and ds.has_field("mask") and not ds.has_field("prompt_embeds")


def test_dataset_num_proc_validates_in_processes(tmp_path):
    path, _ = _write(tmp_path, n=4)
    args = DataArguments(dataset=path, dataset_num_proc=2, dataset_cache_dir=str(tmp_path / "cache"))
    ds = args.build(multiple=4)
    assert len(ds) == 4 and not ds.report.cached and ds[3]["target"].shape == (3, 32, 32)
    assert args.build(multiple=4).report.cached


def test_in_memory_records_keep_every_key_and_name_bad_values():
    recs = synthetic_records(2, size=16)
    del recs[0]["mask"]  # datasets' from_list would take its columns from this first record only
    ds = TripletDataset(recs, multiple=4)
    assert ds[0]["mask"].min() == 1.0 and 0.0 < ds[1]["mask"].mean() < 1.0
    recs[1]["reference"] = 3
    with pytest.raises(DataError, match="a field mixes kinds of values"):
        TripletDataset(recs, multiple=4)
