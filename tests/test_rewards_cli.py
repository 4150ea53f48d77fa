"""`refiner-rl rewards list|score`, in process and as a user runs it, with a third-party plug-in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refiner_rl.cli.rewards import main
from refiner_rl.scoring import registry

FIXTURE = Path(__file__).parent / "fixtures" / "thirdparty_reward"
CLI = str(Path(sys.executable).parent / "refiner-rl")


def _png(path, value, size=(8, 8), mode="RGB"):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def scene(tmp_path):
    """Two samples, their targets and masks, a JSONL matching one by `image` and one by `id`."""
    images, data = tmp_path / "samples", tmp_path / "data"
    images.mkdir(), data.mkdir()
    # sample a: 20 levels brighter than its target inside the mask (left half), equal outside
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    a[:, :4] += 20
    Image.fromarray(a).save(images / "a.png")
    _png(data / "target_a.png", 100)
    # sample b: 10 levels darker everywhere
    _png(images / "b.png", 90)
    _png(data / "target_b.png", 100)
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:, :4] = 255
    Image.fromarray(m, mode="L").save(data / "mask.png")
    records = [
        {"id": "b", "prompt": "fix b", "target": "target_b.png", "mask": "mask.png"},
        {"image": "a.png", "prompt": "fix a", "target": "target_a.png", "mask": "mask.png"},
        {"id": "zzz", "prompt": "no such image", "target": "target_b.png", "mask": "mask.png"},
    ]
    (data / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# refiner-rl rewards score --config recipe.yaml --images samples --data data/records.jsonl\n"
        "model: ignored\n"
        "rewards:\n"
        "  - {name: masked_pixel, weight: 1.0}\n"
        "  - {name: masked_pixel, weight: 0.5, region: outside, error: l1}\n"
    )
    return tmp_path


def test_list_shows_builtins_with_fields_maps_and_description(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "masked_pixel" in lines and "patch_dreamsim" in lines and "dino_similarity" in lines
    assert lines["masked_pixel"].split()[1:5] == ["target", "mask", "yes", "builtin"]
    assert "Negative masked L2/L1 pixel error" in lines["masked_pixel"]
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rewards"]}
    assert rows["patch_dreamsim"]["provides_maps"] is True and rows["patch_dreamsim"]["required_fields"] == ["target"]


def test_score_end_to_end_json_and_table(scene, capsys):
    args = [
        "score",
        "--config",
        str(scene / "recipe.yaml"),
        "--images",
        str(scene / "samples"),
        "--data",
        str(scene / "data" / "records.jsonl"),
    ]
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "1 record(s)" in captured.err  # the `zzz` record matches no image
    assert [r["label"] for r in out["rewards"]] == ["masked_pixel", "masked_pixel_2"]
    rows = {r["image"]: r for r in out["rows"]}
    d_a, d_b = 20 / 255, 10 / 255
    assert rows["a.png"]["scores"]["masked_pixel"] == pytest.approx(-(d_a**2), abs=1e-6)
    assert rows["a.png"]["scores"]["masked_pixel_2"] == pytest.approx(0.0, abs=1e-7)
    assert rows["b.png"]["scores"]["masked_pixel"] == pytest.approx(-(d_b**2), abs=1e-6)
    assert rows["b.png"]["scores"]["masked_pixel_2"] == pytest.approx(-d_b, abs=1e-6)
    assert rows["b.png"]["total"] == pytest.approx(-(d_b**2) - 0.5 * d_b, abs=1e-6)
    assert out["errors"] == {}
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "masked_pixel", "(x1)", "masked_pixel_2", "(x0.5)", "total"]
    assert table[1].split()[0] == "a.png" and table[1].split()[1] == f"{-(d_a**2):.4f}"
    assert table[1].split()[2] == "0.0000"  # -0.0 (no error outside the mask) prints without its sign


def test_score_without_data_runs_only_field_free_rewards(scene, capsys):
    code = main(["score", "--config", str(scene / "recipe.yaml"), "--images", str(scene / "samples")])
    assert code == 2
    err = capsys.readouterr().err
    assert "reward 'masked_pixel' needs target" in err and "pass --data records.jsonl" in err


def test_score_errors_name_the_file_or_the_reward(scene, capsys):
    (scene / "samples" / "broken.png").write_bytes(b"not a png")
    (scene / "data" / "records.jsonl").open("a").write(json.dumps({"id": "broken", "target": "target_b.png"}) + "\n")
    code = main(
        [
            "score",
            "--config",
            str(scene / "recipe.yaml"),
            "--images",
            str(scene / "samples"),
            "--data",
            str(scene / "data" / "records.jsonl"),
        ]
    )
    assert code == 2
    assert "broken.png" in capsys.readouterr().err
    (scene / "samples" / "broken.png").unlink()
    (scene / "samples" / "c.png").write_bytes((scene / "samples" / "b.png").read_bytes())
    assert (
        main(
            [
                "score",
                "--config",
                str(scene / "recipe.yaml"),
                "--images",
                str(scene / "samples"),
                "--data",
                str(scene / "data" / "records.jsonl"),
            ]
        )
        == 2
    )
    assert "no record for image(s) c.png" in capsys.readouterr().err
    bad = scene / "bad.yaml"
    bad.write_text("rewards:\n  - {name: masked_pixle}\n")
    assert main(["score", "--config", str(bad), "--images", str(scene / "samples")]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'masked_pixle'" in err and "masked_pixel" in err


def test_failing_reward_shows_dash_and_error(scene, capsys):
    # target of the wrong size: masked_pixel raises; score_safely turns it into "-" plus the error
    _png(scene / "data" / "target_b.png", 100, size=(4, 4))
    assert (
        main(
            [
                "score",
                "--config",
                str(scene / "recipe.yaml"),
                "--images",
                str(scene / "samples"),
                "--data",
                str(scene / "data" / "records.jsonl"),
                "--batch-size",
                "1",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    rows = {r["image"]: r for r in json.loads(captured.out)["rows"]}
    assert rows["b.png"]["scores"]["masked_pixel"] is None and rows["b.png"]["total"] is None
    assert rows["a.png"]["total"] is not None
    assert "reward 'masked_pixel' failed: ValueError" in captured.err


# -- a third-party plug-in, installed the way a user would (into a throwaway --target folder) -----------


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(FIXTURE, src)  # build outside the repository: no build/ or egg-info left in tests/
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert any(p.name.endswith(".dist-info") for p in target.iterdir())
    return str(target)


def _env(extra_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([extra_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_thirdparty_plugin_listed_and_scores_through_the_cli(plugin_path, scene):
    out = subprocess.run(
        [CLI, "rewards", "list"],
        env=_env(plugin_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("mean_brightness"))
    assert "entry point (refiner-rl-thirdparty-reward-fixture)" in line
    assert "Mean pixel value of the sample" in line
    recipe = scene / "plugin.yaml"
    recipe.write_text("rewards:\n  - {name: mean_brightness, scale: 2.0, weight: 0.5}\n")
    out = subprocess.run(
        [CLI, "rewards", "score", "--config", str(recipe), "--images", str(scene / "samples"), "--json"],
        env=_env(plugin_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["image"]: r for r in json.loads(out.stdout)["rows"]}
    assert rows["b.png"]["scores"]["mean_brightness"] == pytest.approx(2.0 * 90 / 255, abs=1e-6)
    assert rows["b.png"]["total"] == pytest.approx(0.5 * 2.0 * 90 / 255, abs=1e-6)
    # without the plug-in on the path, the name is unknown and the error lists the known ones
    out = subprocess.run(
        [CLI, "rewards", "score", "--config", str(recipe), "--images", str(scene / "samples")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 2 and "unknown reward 'mean_brightness'" in out.stderr and "masked_pixel" in out.stderr


def test_thirdparty_plugin_in_process(plugin_path):
    sys.path.insert(0, plugin_path)
    try:
        registry.discover(refresh=True)
        assert "mean_brightness" in registry.available_rewards()
        (r,) = registry.build_reward_funcs([{"name": "mean_brightness", "scale": 3.0}])
        assert r([""], [np.full((2, 2, 3), 51, dtype=np.uint8)]) == [pytest.approx(3.0 * 0.2)]
        with pytest.raises(registry.RewardConfigError, match="accepted options: device, dtype, scale$"):
            registry.build_reward_funcs([{"name": "mean_brightness", "bias": 1}])
    finally:
        sys.path.remove(plugin_path)
        registry._REGISTRY.pop("mean_brightness", None)
        registry._SOURCES.pop("mean_brightness", None)
