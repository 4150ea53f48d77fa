"""Resuming, checkpoint checks, W&B placement, errors and help of ``refiner-rl sft|grpo``, run as a user runs
them (subprocesses). One short SFT run (two checkpoints) is shared by the tests of this module."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from refiner_rl.errors import CheckpointError
from refiner_rl.trainers.checkpoints import resolve_checkpoint
from tests.test_cli import ROOT, run_cli

SFT_RECIPE = os.path.join(ROOT, "recipes/tiny/sft.yaml")
SFT_SHORT = [
    "--synthetic_records",
    "8",
    "--synthetic_eval_records",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--save_steps",
    "1",
    "--save_total_limit",
    "3",
    "--logging_steps",
    "1",
    "--sample_steps",
    "2",
    "--num_sample_images",
    "2",
    "--sample_inference_steps",
    "2",
]


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _error_line(r, stage: str) -> str:
    """The one error line of an expected failure: exit code 2, no traceback, last on stderr."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith(f"refiner-rl {stage}: error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    return errors[0]


def _state(out) -> dict:
    return json.load(open(os.path.join(out, "trainer_state.json")))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """``refiner-rl sft`` for 2 steps (checkpoint-1, checkpoint-2), W&B offline: the folder every test copies."""
    cwd = tmp_path_factory.mktemp("sft_run")
    r = _ok(run_cli(["sft", "--config", SFT_RECIPE, "--output_dir", "out", "--max_steps", "2", *SFT_SHORT], cwd))
    return cwd, cwd / "out", r


def _copy(sft_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sft_run[1], out)
    return out


def test_sft_writes_wandb_and_samples_under_output_dir(sft_run):
    cwd, out, r = sft_run
    assert sorted(os.listdir(out)) == [
        "checkpoint-1",
        "checkpoint-2",
        "refiner_rl_model.json",
        "samples",
        "trainer_state.json",
        "training_args.bin",
        "transformer",
        "wandb",
        "wandb_run_id",
    ]
    assert not (cwd / "wandb").exists(), "W&B files belong to the run's output_dir"
    run_id = (out / "wandb_run_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")] == [run_id]
    assert sorted(os.listdir(out / "samples")) == ["step-000002.png"]
    from PIL import Image

    grid = Image.open(out / "samples" / "step-000002.png")
    assert grid.size == (4 * 32 * 4, 2 * 32 * 4)  # draft | reference | sample | target, 2 rows, 32 px upscaled 4x
    # the console log prints numbers, not quoted strings
    line = next(x for x in r.stdout.splitlines() if "| loss " in x)
    assert re.search(r"step 1/2 \| loss \d", line) and "'" not in line, line


def test_sft_resume_true_continues_the_newest_checkpoint_and_its_wandb_run(sft_run, tmp_path):
    out = _copy(sft_run, tmp_path)
    r = _ok(
        run_cli(
            [
                "sft",
                "--config",
                SFT_RECIPE,
                "--output_dir",
                "out",
                "--max_steps",
                "3",
                *SFT_SHORT,
                "--resume_from_checkpoint",
                "true",
            ],
            tmp_path,
        )
    )
    assert "resuming from out/checkpoint-2" in r.stdout
    state = _state(out)
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]  # history continues, not restarts
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {run_id}, runs
    assert not (tmp_path / "wandb").exists()


def test_corrupt_checkpoints_name_the_file_and_the_intact_one(sft_run, tmp_path):
    out = _copy(sft_run, tmp_path)
    ck1, ck2 = str(out / "checkpoint-1"), str(out / "checkpoint-2")
    assert resolve_checkpoint("true", str(out)) == ck2 == resolve_checkpoint(True, str(out))
    assert resolve_checkpoint("false", str(out)) is None and resolve_checkpoint(None, str(out)) is None

    optimizer = out / "checkpoint-2" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])  # a write killed halfway
    for value in ("true", "latest", ck2):
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint(value, str(out))
        assert f"{ck2}/optimizer.pt: truncated" in str(e.value) and f"intact checkpoint is {ck1}" in str(e.value)
    assert resolve_checkpoint("latest_valid", str(out)) == ck1

    state = out / "checkpoint-1" / "trainer_state.json"
    state.write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoint-1/trainer_state.json: not a trainer state.*no older intact"):
        resolve_checkpoint(ck1, str(out))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resolve_checkpoint("latest_valid", str(out))
    weights = out / "checkpoint-1" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    state.write_text(json.dumps({"global_step": 1}))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: truncated"):
        resolve_checkpoint(ck1, str(out))
    with pytest.raises(CheckpointError, match="no checkpoint-N folder"):
        resolve_checkpoint("true", str(tmp_path / "empty"))


def test_cli_corrupt_checkpoint_is_one_line_and_latest_valid_falls_back(sft_run, tmp_path):
    out = _copy(sft_run, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    args = ["sft", "--config", SFT_RECIPE, "--output_dir", "out", "--max_steps", "2", *SFT_SHORT, "--report_to", "none"]
    line = _error_line(run_cli([*args, "--resume_from_checkpoint", "true"], tmp_path), "sft")
    assert "out/checkpoint-2/optimizer.pt: truncated" in line and "intact checkpoint is out/checkpoint-1" in line
    assert "latest_valid" in line
    r = _ok(run_cli([*args, "--resume_from_checkpoint", "latest_valid"], tmp_path))
    assert "resuming from out/checkpoint-1" in r.stdout
    assert _state(out)["global_step"] == 2
    assert [h["step"] for h in _state(out)["log_history"] if "loss" in h] == [1, 2]


def test_grpo_resume_true_from_the_command_line(tmp_path):
    args = [
        "grpo",
        "--config",
        os.path.join(ROOT, "recipes/tiny/grpo.yaml"),
        "--output_dir",
        "g",
        "--transformer_path",
        "",
        "--synthetic_records",
        "2",
        "--synthetic_eval_records",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "2",
        "--num_inference_steps",
        "3",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--sample_steps",
        "1",
        "--report_to",
        "none",
    ]
    r = _ok(run_cli([*args, "--max_steps", "1"], tmp_path))
    assert "GRPO on 2 records (0 skipped)" in r.stdout
    r = _ok(run_cli([*args, "--max_steps", "2", "--resume_from_checkpoint", "true"], tmp_path))
    assert "resuming from g/checkpoint-1" in r.stdout
    state = _state(tmp_path / "g")
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]
    from PIL import Image

    samples = tmp_path / "g" / "samples"
    assert sorted(os.listdir(samples)) == ["step-000001.png", "step-000002.png"]
    # the last rollout's draft | reference | sample | target, one row per sample (4), 32 px upscaled 4x
    assert Image.open(samples / "step-000002.png").size == (4 * 32 * 4, 4 * 32 * 4)


def test_readme_resume_line_runs_as_printed(sft_run, tmp_path):
    """The README's resume command, verbatim, in a folder whose outputs/tiny-sft holds the tiny recipe's last
    checkpoint (the shared run's checkpoint-2, renumbered as the recipe's final step): it resumes from it."""
    import yaml

    lines = [x.strip() for x in open(os.path.join(ROOT, "README.md")) if "--resume_from_checkpoint" in x]
    commands = [x for x in lines if x.startswith("refiner-rl ")]
    assert len(commands) == 1, lines
    argv = commands[0].split()[1:]
    assert argv[:3] == ["sft", "--config", "recipes/tiny/sft.yaml"], argv
    recipe = yaml.safe_load(open(SFT_RECIPE))
    final = tmp_path / "outputs" / "tiny-sft" / f"checkpoint-{recipe['max_steps']}"
    shutil.copytree(sft_run[1] / "checkpoint-2", final)
    state = json.load(open(final / "trainer_state.json"))
    state.update(global_step=recipe["max_steps"], max_steps=recipe["max_steps"])
    json.dump(state, open(final / "trainer_state.json", "w"))
    os.symlink(os.path.join(ROOT, "recipes"), tmp_path / "recipes")
    r = _ok(run_cli(argv, tmp_path))
    assert f"resuming from outputs/tiny-sft/checkpoint-{recipe['max_steps']}" in r.stdout
    assert (tmp_path / "outputs" / "tiny-sft" / "transformer").is_dir()


def test_expected_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("model_name_or_path: tiny\nlearning_rat: 0.1\n")
    r = run_cli(["sft", "--config", str(bad), "--output_dir", "o"], tmp_path)
    assert r.stderr.strip().splitlines() == [_error_line(r, "sft")]  # nothing else on stderr
    assert "learning_rat" in r.stderr and "fail_with_unknown_args" not in r.stderr

    from refiner_rl.cli.main import main

    for argv, needle in (
        (["--max_ste", "1"], "unknown option(s) --max_ste 1"),  # abbreviations are not accepted
        (["--caption_dropout", "3"], "`caption_dropout` must be in [0, 1)"),  # a config's own check
        (["--lora_r", "x"], "--lora_r"),
        (["--resume_from_checkpoint", str(tmp_path / "nowhere")], "no such checkpoint folder"),
    ):
        capsys.readouterr()
        assert main(["sft", "--config", SFT_RECIPE, "--output_dir", str(tmp_path / "o"), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("refiner-rl sft: error:") and needle in err[0], err
    with pytest.raises(CheckpointError):  # --debug: the traceback instead
        main(["sft", "--config", SFT_RECIPE, "--resume_from_checkpoint", str(tmp_path / "nowhere"), "--debug"])


def test_help_is_short_lists_config_and_imports_nothing_heavy(tmp_path):
    for stage in ("sft", "grpo"):
        r = _ok(run_cli([stage, "--help"], tmp_path))
        lines = r.stdout.splitlines()
        assert lines[0].startswith(f"usage: refiner-rl {stage} --config RECIPE.yaml"), lines[0]
        assert len(lines) < 200 and "--help-all" in r.stdout and "--resume_from_checkpoint" in r.stdout
    code = (
        "import sys; from refiner_rl.cli.main import main; main(['grpo', '--help']); "
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:] + r.stderr[-2000:]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_short_help_lists_exactly_the_real_options(stage):
    """The short help reads the config sources: every option it shows is one the real parser takes, with the
    real default, and every option the project defines is shown."""
    import dataclasses

    from refiner_rl.cli.options import GROUPS, stage_help
    from refiner_rl.cli.train import _recipe_parser, _stage_types

    text = stage_help(stage)
    shown = re.findall(r"^  --(\w[\w-]*)", text, flags=re.M)
    parser_options = {s[2:] for a in _recipe_parser(_stage_types(stage))._actions for s in a.option_strings}
    assert set(shown) - {"config", "debug", "help-all"} <= parser_options
    blocks = {
        m.group(1): " ".join(m.group(2).split())
        for m in re.finditer(r"^  --(\S+)(.*?)(?=^  --|^$|\Z)", text, re.M | re.S)
    }
    own = set()
    for cls in _stage_types(stage):
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in cls.__dict__.get("__annotations__", {}):
                continue
            own.add(f.name)
            if isinstance(f.default, (int, float, str)) and f.default is not None:  # the real default is shown
                assert f"(default: {f.default!r})" in blocks[f.name], (f.name, blocks[f.name])
    assert own <= set(shown), own - set(shown)
    assert [title for title, _, _ in GROUPS[stage]][:2] == ["model", "data"]
