"""Triplet loading and validation: every bad input gets an error naming the record and the field."""

import json

import pytest
import torch
from PIL import Image

from refiner_rl.data import RecordError, TripletDataset, collate_triplets, load_records, write_synthetic_dataset
from refiner_rl.data.synthetic import synthetic_records


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
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{not json\n')
    with pytest.raises(RecordError, match="line 2 is not valid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))


def test_skip_invalid_counts_instead_of_failing(tmp_path):
    path, rows = _write(tmp_path, n=4)
    Image.new("L", (32, 32), 0).save(tmp_path / rows[3]["mask"])
    ds = TripletDataset.from_source(path, skip_invalid=True)
    assert len(ds) == 3 and len(ds.report.skipped) == 1 and "record 3" in ds.report.skipped[0]


def test_mixed_sizes_in_one_batch_is_a_clear_error_and_buckets_fix_it():
    recs = synthetic_records(4, size=32) + synthetic_records(4, seed=5, size=48)
    ds = TripletDataset(recs, multiple=16)
    with pytest.raises(RecordError, match="different 'draft' sizes"):
        collate_triplets([ds[0], ds[5]])
    from refiner_rl.data import BucketBatchOrderSampler

    bucketed = TripletDataset(recs, multiple=16, buckets=[32, 48])
    order = list(BucketBatchOrderSampler(bucketed, batch_size=2, seed=0))
    assert len(order) == 8
    for i in range(0, 8, 2):
        collate_triplets([bucketed[order[i]], bucketed[order[i + 1]]])  # never mixes sizes


def test_resolution_keeps_aspect_and_multiple():
    recs = synthetic_records(1, size=32)
    ds = TripletDataset(recs, resolution=64, multiple=16)
    assert ds[0]["draft"].shape == (3, 64, 64) and ds[0]["mask"].shape == (1, 64, 64)
