"""`refiner-rl data build`: clean images -> triplets the trainers read, reproducibly, with a cache per stage."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from refiner_rl.cli.main import main
from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.data.build import DataBuildConfig, build_dataset
from refiner_rl.data.build.degrade import parse_operators
from refiner_rl.data.build.ingest import near_duplicates
from refiner_rl.data.build.region import auto_regions
from refiner_rl.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "recipes", "data", "tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(rng, w, h) -> Image.Image:
    """A smooth colour gradient with a patch of small text: detail in one place, like a photo of a label."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (0.6 * xx + 0.4 * yy)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    for row in range(3):
        draw.text((x, y + 7 * row), "".join(rng.choice(list("AKX#@%01"), 4)), fill=tuple(int(v) for v in c1 ^ 255))
    return img


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """6 good images (one also as a near-duplicate JPEG), a corrupt file, a too-small image, an 8-bit-in-16-bit one."""
    d = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    for i in range(6):
        _photo(
            rng,
            48 if i % 2 else 40,
            40,
        ).save(d / f"photo{i}.png")
    dup = np.asarray(Image.open(d / "photo0.png")).astype(int) + 2
    Image.fromarray(np.clip(dup, 0, 255).astype(np.uint8)).save(d / "z_photo0_copy.jpg", quality=95)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "small.png")
    Image.fromarray(np.full((40, 40), 200, np.uint16)).save(d / "grey16.png")
    (d / "notes.txt").write_text("not an image: ignored")
    return d


def _build(argv) -> dict:
    assert main(["data", "build", "--config", TINY, *argv]) == 0
    out = argv[argv.index("--output_dir") + 1]
    return json.load(open(os.path.join(out, "report.json")))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "out"
    report = _build(["--source", str(source), "--output_dir", str(out), "--num_proc", "2"])
    return out, report


def _records(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "records.jsonl"))]


def _array(folder, name, mask=False):
    return np.asarray(Image.open(os.path.join(folder, name)).convert("L" if mask else "RGB")).astype(int)


def test_folder_build_skips_bad_images_and_writes_triplets(built):
    out, report = built
    ingest = report["stages"][0]
    assert (ingest["input"], ingest["kept"]) == (10, 6)
    assert ingest["dropped"] == {"duplicate": 1, "too_small": 1, "unreadable": 2}
    named = " ".join(m for msgs in ingest["examples"].values() for m in msgs)
    assert all(
        f in named for f in ("broken.png", "grey16.png", "small.png", "z_photo0_copy.jpg' duplicates 'photo0.png'")
    )
    assert [s["stage"] for s in report["stages"]] == ["1-ingest", "2-region", "3-degrade", "4-filter"]
    train, held = _records(out / "train"), _records(out / "heldout")
    assert len(train) + len(held) == report["stages"][-1]["kept"] and held and train
    assert not {r["source_id"] for r in train} & {r["source_id"] for r in held}, "split by source image"
    for folder, rec in [(out / "train", r) for r in train] + [(out / "heldout", r) for r in held]:
        target, draft = _array(folder, rec["target"]), _array(folder, rec["draft"])
        inside = _array(folder, rec["mask"], mask=True) >= 128
        assert (draft[~inside] == target[~inside]).all(), "right outside the mask"
        mse = ((draft[inside] - target[inside]) / 255.0) ** 2
        assert mse.mean() >= 0.0005 and rec["metrics"]["mse_inside"] == pytest.approx(mse.mean(), rel=1e-3)
        x0, y0, x1, y1 = rec["region"]
        assert inside[y0:y1, x0:x1].all() and inside.sum() == (x1 - x0) * (y1 - y0)
        assert 1 <= len(rec["degradations"]) <= 2 and all("op" in d for d in rec["degradations"])
        t = np.array(rec["ref_transform"]).reshape(3, 3)
        assert not np.allclose(t, np.eye(3), atol=0.05), "the reference is never pixel-aligned"
        assert rec["ref_geometry"] in ("zoomed", "shifted")
    ds = TripletDataset.from_source(str(out / "train"), resolution=32)
    item = ds[0]
    assert item["draft"].shape == item["target"].shape == (3, 32, 32) and item["mask"].sum() > 0
    assert len(TripletDataset.from_source(str(out / "train.parquet"))) == len(train)
    assert "| 1-ingest | 10 | 6 |" in open(out / "report.md").read()


def test_same_seed_gives_identical_records_and_a_deleted_stage_reruns_alone(built, source, tmp_path):
    first, _ = built
    out = tmp_path / "again"
    argv = ["--source", str(source), "--output_dir", str(out)]
    report = _build(argv)  # one process this time: the records must not depend on num_proc
    assert not any(s["cached"] for s in report["stages"])

    def same(a, b):
        for split in ("train", "heldout"):
            assert open(a / split / "records.jsonl").read() == open(b / split / "records.jsonl").read()
            for f in sorted(os.listdir(a / split / "images")):
                assert (a / split / "images" / f).read_bytes() == (b / split / "images" / f).read_bytes(), f

    same(first, out)
    shutil.rmtree(out / "stages" / "3-degrade")
    report = _build(argv)
    assert [s["cached"] for s in report["stages"]] == [True, True, False, False]
    same(first, out)
    report = _build([*argv, "--min_inside_mse", "0.0006"])  # a filter option: only stage 4 reruns
    assert [s["cached"] for s in report["stages"]] == [True, True, True, False]


def test_sft_trains_on_the_built_dataset_unchanged(built, tmp_path):
    out, _ = built
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "refiner_rl", "sft", "--config", os.path.join(ROOT, "recipes/tiny/sft.yaml")]
    cmd += ["--dataset", str(out / "train"), "--eval_dataset", str(out / "heldout"), "--resolution", "32"]
    cmd += ["--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--per_device_train_batch_size", "2"]
    cmd += ["--logging_steps", "1", "--report_to", "none", "--save_steps", "1000"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.load(open(tmp_path / "sft" / "trainer_state.json"))
    assert state["global_step"] == 2 and any("loss" in h for h in state["log_history"])


def test_synthetic_images_auto_regions_find_the_detail(tmp_path):
    """On the synthetic generator's targets (detail in a known square), the automatic region lands on the detail."""
    src = tmp_path / "syn"
    src.mkdir()
    records = synthetic_records(6, seed=5, size=32)
    for r in records:
        r["target"].save(src / f"{r['id']}.png")
    out = tmp_path / "out"
    opts = ["--degrade", "downsample:2-4", "blur:0.5-1.5", "--degrade_pick", "1", "--heldout_fraction", "0"]
    _build(["--source", str(src), "--output_dir", str(out), "--region_fraction", "0.25", "0.25", *opts])
    built = {r["source_id"]: r for r in _records(out / "train")}
    assert len(built) >= 5 and not os.path.exists(out / "heldout")
    inside = []
    for r in records:
        if f"{r['id']}.png" in built:
            x0, y0, x1, y1 = built[f"{r['id']}.png"]["region"]
            inside.append((np.asarray(r["mask"]) >= 128)[y0:y1, x0:x1].mean())
    # a window placed at random would have a quarter of its pixels in the 16 px detail square of a 32 px image
    assert min(inside) > 0 and np.mean(inside) >= 0.6, inside


def box_detector(img):
    """A stand-in face detector: one box partly outside the image (it is clipped)."""
    return [[-5, 4, 20, img.size[1] + 8]]


def test_region_detector_boxes_become_the_regions(tmp_path):
    src = tmp_path / "syn"
    src.mkdir()
    for r in synthetic_records(3, seed=2, size=32):
        r["target"].save(src / f"{r['id']}.png")
    out = tmp_path / "out"
    argv = ["--source", str(src), "--output_dir", str(out), "--degrade", "blur:2", "jpeg:50", "--heldout_fraction", "0"]
    _build([*argv, "--region_detector", "tests.test_data_build:box_detector"])
    assert [r["region"] for r in _records(out / "train")] == [[0, 4, 20, 32]] * 3
    with pytest.raises(ConfigError, match="`region_detector` 'tests.nowhere:f' cannot be imported"):
        DataBuildConfig(source=str(src), region_detector="tests.nowhere:f")
    with pytest.raises(DataError, match="no record left after stage 1-ingest .*too_small.*below min_size 256"):
        build_dataset(DataBuildConfig(source=str(src), output_dir=str(tmp_path / "big")))  # 32 px < 256 px


def test_table_source_with_region_and_reference_columns_and_the_filter(tmp_path):
    """A parquet source gives each image's box and reference; a no-op degradation is dropped by the filter."""
    import datasets

    rows = []
    for r in synthetic_records(8, seed=7, size=32):
        m = np.asarray(r["mask"]) >= 128
        ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        box = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
        rows.append({"name": r["id"], "image": r["target"], "box": box, "ref": r["reference"]})
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).cast_column("ref", datasets.Image())
    table.to_parquet(str(tmp_path / "src.parquet"))
    out = tmp_path / "out"
    argv = ["--source", str(tmp_path / "src.parquet"), "--output_dir", str(out), "--id_column", "name"]
    argv += ["--region_column", "box", "--reference_column", "ref", "--degrade", "noise:0", "downsample:4"]
    report = _build([*argv, "--degrade_pick", "1", "--heldout_fraction", "0", "--seed", "1"])
    dropped = report["stages"][-1]["dropped"]
    kept = _records(out / "train")
    assert dropped == {"draft_right_inside": 8 - len(kept)} and 0 < len(kept) < 8
    for rec in kept:
        assert rec["degradations"] == [{"op": "downsample", "factor": 4}] and rec["ref_geometry"] == "given"
        assert rec["region"] == next(r["box"] for r in rows if r["name"] == rec["source_id"])
        assert "ref_transform" not in rec
    with pytest.raises(DataError, match="no column 'bbox' \\(`region_column`\\)"):
        build_dataset(DataBuildConfig(source=str(tmp_path / "src.parquet"), region_column="bbox", output_dir=str(out)))


def test_near_duplicates_match_brute_force():
    rng = np.random.default_rng(0)
    base = [int(v) for v in rng.integers(0, 2**63, 40)]
    hashes = base + [h ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64))) for h in base[:10]]
    for d in (0, 2, 5):
        got = near_duplicates(hashes, d)
        kept = []
        for i, h in enumerate(hashes):
            match = [j for j in kept if bin(h ^ hashes[j]).count("1") <= d]
            assert got[i] == (min(match) if match else -1)
            if not match:
                kept.append(i)
    assert near_duplicates(hashes, 2)[40:] == list(range(10)) and near_duplicates(hashes, -1) == [-1] * 50


def test_auto_region_on_a_flat_image_with_one_textured_square():
    arr = np.full((64, 64, 3), 120, np.uint8)
    arr[40:56, 8:24] = (np.indices((16, 16)).sum(0) % 2 * 255)[..., None]  # a 1-px checkerboard
    boxes = auto_regions(Image.fromarray(arr), np.random.default_rng(0), 1, (0.25, 0.25), 0.02)
    assert boxes == [[8, 40, 24, 56]]
    assert auto_regions(Image.new("RGB", (64, 64), (80, 80, 80)), np.random.default_rng(0), 1, (0.25, 0.25), 0.02) == []


def test_bad_options_and_inputs_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown operator 'blurr'; known: downsample, blur"):
        parse_operators(["blurr:1"])
    with pytest.raises(ConfigError, match="quality must be integers with 1 <= min <= max <= 100"):
        parse_operators(["jpeg:0-120"])
    with pytest.raises(ConfigError, match="`degrade` uses `vae` or `regenerate`, which need `editor`"):
        DataBuildConfig(source="x", degrade=["vae"])
    missing = str(tmp_path / "nowhere")
    assert main(["data", "build", "--config", TINY, "--source", missing, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refiner-rl data: error: source") and missing in err[0]
    assert main(["data", "build", "--config", TINY, "--source", str(tmp_path), "--degrade", "blurr:1"]) == 2
    assert "unknown operator 'blurr'" in capsys.readouterr().err
    assert main(["data", "frobnicate"]) == 2
    assert "unknown data command 'frobnicate'; known: build" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["triplets.yaml", "tiny.yaml"])
def test_recipes_parse_and_open_with_their_command(name):
    from refiner_rl.cli.train import parse_recipe

    path = os.path.join(ROOT, "recipes", "data", name)
    assert f"refiner-rl data build --config recipes/data/{name}" in open(path).read()
    (config,) = parse_recipe((DataBuildConfig,), ["--config", path])
    assert config.degrade and config.buckets == sorted(config.buckets)
