"""Synthetic triplets: the aligned default is unchanged, every geometry is seeded, and the recorded geometry says
where the region's detail is in the reference."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from refiner_rl.data import TripletDataset
from refiner_rl.data.synthetic import parse_geometry, synthetic_records
from refiner_rl.errors import ConfigError

IMAGES = ("target", "draft", "reference", "mask")


def _hash(records) -> str:
    h = hashlib.sha256()
    for r in records:
        for key in IMAGES:
            h.update(r[key].tobytes())
        h.update(r["id"].encode())
        h.update(r["prompt"].encode())
    return h.hexdigest()[:16]


def _arr(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def _region(record) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(_arr(record["mask"]))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _detail_in_reference(record) -> tuple[np.ndarray, np.ndarray]:
    """The reference sampled where ``ref_transform`` sends the target region's pixel centres, colour change
    undone, and which of those points fall inside the reference."""
    x0, y0, x1, y1 = _region(record)
    ref = _arr(record["reference"])
    t = np.asarray(record["ref_transform"]).reshape(3, 3)
    gain, bias = np.asarray(record["ref_color"][:3]), np.asarray(record["ref_color"][3:]) * 255
    jj, ii = np.mgrid[y0:y1, x0:x1]
    p = np.stack([ii.ravel() + 0.5, jj.ravel() + 0.5, np.ones(ii.size)], 1) @ t.T
    p = p[:, :2] / p[:, 2:]
    h, w = ref.shape[:2]
    inside = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
    px, py = np.clip(np.floor(p[:, 0]).astype(int), 0, w - 1), np.clip(np.floor(p[:, 1]).astype(int), 0, h - 1)
    return (ref[py, px] - bias) / gain, inside


def test_aligned_default_is_unchanged():
    """Pixel hashes snapshotted from the generator before geometries were added."""
    assert _hash(synthetic_records(6, seed=0)) == "f0c1408e96944403"
    assert _hash(synthetic_records(6, seed=1234, size=32)) == "3f10c843dc9f1cc1"
    assert _hash(synthetic_records(4, seed=7, size=48, region=0.4, ref_shift=3)) == "e6c67766f55958f8"
    for r in synthetic_records(3, seed=0):
        x0, y0, x1, y1 = _region(r)
        assert r["ref_geometry"] == "aligned" and r["ref_box"] == [x0, y0, x1, y1]
        assert r["ref_transform"] == [1, 0, 0, 0, 1, 0, 0, 0, 1] and r["ref_color"] == [1, 1, 1, 0, 0, 0]
        np.testing.assert_array_equal(_arr(r["reference"])[y0:y1, x0:x1], _arr(r["target"])[y0:y1, x0:x1])


@pytest.mark.parametrize("geometry", ["shifted", "zoomed", "view", "aligned=1,zoomed=1,view=2"])
def test_geometry_is_reproducible_by_seed(geometry):
    opts = dict(size=32, geometry=geometry, textures="extended", degrade="pool+blur+jpeg")
    a, b, c = (synthetic_records(4, seed=s, **opts) for s in (5, 5, 6))
    assert _hash(a) == _hash(b) != _hash(c)
    assert [{k: v for k, v in r.items() if k not in IMAGES} for r in a] == [
        {k: v for k, v in r.items() if k not in IMAGES} for r in b
    ]


@pytest.mark.parametrize("geometry", ["shifted", "zoomed", "view"])
@pytest.mark.parametrize("textures", ["classic", "extended"])
def test_reference_detail_is_where_the_geometry_says_and_not_aligned(geometry, textures):
    for r in synthetic_records(6, seed=11, size=48, geometry=geometry, textures=textures):
        assert r["ref_geometry"] == geometry
        x0, y0, x1, y1 = region = _region(r)
        target = _arr(r["target"])[y0:y1, x0:x1]
        found, inside = _detail_in_reference(r)
        err_found = np.abs(found - target.reshape(-1, 3))[inside].mean()
        err_aligned = np.abs(_arr(r["reference"])[y0:y1, x0:x1] - target).mean()
        assert inside.mean() > 0.8
        assert err_found < (0.5 if geometry != "view" else 8.0)  # view: only the colour clipping differs
        assert err_aligned > err_found + 5.0, (geometry, r["id"], err_aligned, err_found)
        assert r["ref_box"] != list(region)
        bx0, by0, bx1, by1 = r["ref_box"]
        crop = r["reference"].crop((bx0, by0, bx1, by1)).resize((x1 - x0, y1 - y0), Image.NEAREST)
        if geometry == "shifted":  # same scale: the box holds the region's exact pixels
            np.testing.assert_array_equal(_arr(crop), target)
        elif geometry == "zoomed":  # the box, resized back, is close to the region
            assert (bx1 - bx0) > (x1 - x0) and np.abs(_arr(crop) - target).mean() < err_aligned
        # the draft is the target with the region degraded and nothing else
        outside = _arr(r["mask"]) == 0
        np.testing.assert_array_equal(_arr(r["draft"])[outside], _arr(r["target"])[outside])
        assert np.abs(_arr(r["draft"])[y0:y1, x0:x1] - target).mean() > 1.0


def test_mix_draws_each_geometry_and_records_load():
    records = synthetic_records(40, seed=2, size=32, geometry={"aligned": 1, "shifted": 1, "view": 2})
    counts = {g: sum(r["ref_geometry"] == g for r in records) for g in ("aligned", "shifted", "zoomed", "view")}
    assert counts["zoomed"] == 0 and all(counts[g] >= 5 for g in ("aligned", "shifted", "view")), counts
    assert counts["view"] > counts["aligned"]
    ds = TripletDataset(records[:3], multiple=4)
    assert len(ds) == 3 and ds[0]["reference"].shape == (3, 32, 32)


def test_bad_geometry_options_are_config_errors():
    assert parse_geometry("aligned, zoomed") == {"aligned": 0.5, "zoomed": 0.5}
    assert parse_geometry("aligned=1,view=3") == {"aligned": 0.25, "view": 0.75}
    with pytest.raises(ConfigError, match=r"unknown or missing geometry \['rotated'\]; use one of aligned"):
        synthetic_records(1, geometry="rotated")
    with pytest.raises(ConfigError, match="weight 'x' of 'view' is not a number"):
        parse_geometry("view=x")
    with pytest.raises(ConfigError, match="min zoom <= 2.00"):
        synthetic_records(1, region=0.5, geometry="zoomed", zoom_range=(2.5, 3.0))
    with pytest.raises(ConfigError, match="geometry `shifted` needs room"):
        synthetic_records(1, region=1.0, geometry="shifted")
    with pytest.raises(ConfigError, match=r"synthetic degrade 'pool\+sharpen'"):
        synthetic_records(1, degrade="pool+sharpen")


def test_data_arguments_pass_the_geometry_options():
    from transformers import HfArgumentParser

    from refiner_rl.configs import DataArguments

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--synthetic_geometry", "zoomed", "--synthetic_zoom_range", "1.2", "1.4", "--synthetic_records", "3"]
    )
    assert DataArguments().synthetic_geometry == "aligned" and args.synthetic_zoom_range == [1.2, 1.4]
    ds = args.build(multiple=4)
    zooms = [ds.record(i)["ref_transform"][0] for i in range(len(ds))]
    assert [ds.record(i)["ref_geometry"] for i in range(3)] == ["zoomed"] * 3 and all(1.2 <= z <= 1.4 for z in zooms)
    with pytest.raises(ConfigError, match="synthetic geometry 'sideways'"):
        DataArguments(synthetic_geometry="sideways", synthetic_records=2).build(multiple=4)


def test_written_dataset_keeps_the_geometry_fields(tmp_path, monkeypatch):
    import json

    import datasets

    from refiner_rl.data import write_synthetic_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    path = write_synthetic_dataset(str(tmp_path / "data"), 2, seed=3, geometry="view")
    rows = [json.loads(line) for line in open(path)]
    records = synthetic_records(2, seed=3, geometry="view")
    assert [r["ref_transform"] for r in rows] == [r["ref_transform"] for r in records]
    assert rows[0]["ref_geometry"] == "view" and rows[0]["reference"] == "syn-3-0_reference.png"
    ds = TripletDataset.from_source(path, multiple=4)
    assert ds.record(1)["ref_box"] == records[1]["ref_box"] and ds[1]["draft"].shape == (3, 32, 32)


def test_shift_step_pans_by_whole_steps():
    records = synthetic_records(40, seed=3, size=32, geometry="shifted", shift_step=4)
    pans = {(r["ref_transform"][2], r["ref_transform"][5]) for r in records}
    # whole 4-px steps within the 8-px pan (a quarter of 32), never the aligned position; the region stays in view
    assert all(dx % 4 == 0 and dy % 4 == 0 and abs(dx) <= 8 and abs(dy) <= 8 for dx, dy in pans) and len(pans) > 8
    assert (0, 0) not in pans
    for r in records:
        x0, y0, x1, y1 = _region(r)
        dx, dy = int(r["ref_transform"][2]), int(r["ref_transform"][5])
        np.testing.assert_array_equal(
            _arr(r["reference"])[y0 + dy : y1 + dy, x0 + dx : x1 + dx], _arr(r["target"])[y0:y1, x0:x1]
        )
    with pytest.raises(ConfigError, match="shift_step must be a whole number of pixels >= 1, got 0"):
        synthetic_records(1, geometry="shifted", shift_step=0)


def test_curriculum_splits_the_records_and_the_sampler_runs_the_phases_in_order():
    from refiner_rl.configs import DataArguments
    from refiner_rl.trainers.sft_trainer import CurriculumSampler

    args = DataArguments(synthetic_records=16, synthetic_curriculum={"aligned": 1, "shifted=1,zoomed=1": 3})
    assert args.synthetic_curriculum == {"aligned": 0.25, "shifted=1,zoomed=1": 0.75}
    ds = args.build(multiple=4)
    # 16 x 0.25 = 4 aligned records first, then 12 shifted or zoomed ones (phase 1 drawn with seed + 1000)
    assert ds.curriculum == [(0, 4, 0.25), (4, 16, 0.75)]
    kinds = [ds.record(i)["ref_geometry"] for i in range(16)]
    assert kinds[:4] == ["aligned"] * 4 and set(kinds[4:]) == {"shifted", "zoomed"}
    assert ds.record(4)["id"] == "syn-2234-0"
    # 10 steps of 3 samples: phase 0 fills steps 0-1 (round(0.25 * 10) = 2; 6 samples from 4 records: a second
    # pass), phase 1 steps 2-9 (24 samples from 12 records: two passes)
    order = list(CurriculumSampler(ds.curriculum, steps=10, per_step=3, seed=0))
    assert len(order) == 30 and all(i < 4 for i in order[:6]) and all(4 <= i < 16 for i in order[6:])
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[6:18]) == list(range(4, 16))
    assert DataArguments(synthetic_records=4).build(multiple=4).__dict__.get("curriculum") is None
    with pytest.raises(ConfigError, match="fraction of phase 'aligned' must be a number > 0, got 0"):
        DataArguments(synthetic_curriculum={"aligned": 0})
    with pytest.raises(ConfigError, match="synthetic geometry 'tilted'"):
        DataArguments(synthetic_curriculum='{"tilted": 1}')
