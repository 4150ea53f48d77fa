"""The CLI, launched the way a user launches it."""

import json
import os
import subprocess
import sys

import torch

from tests.helpers import tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd, timeout=900):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "refiner_rl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("sft", "grpo", "demo", "rewards"))
    r = run_cli(["trian"], tmp_path)
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr


def _same_velocity(policy, transformer, atol=1e-5):
    torch.manual_seed(0)
    cond = policy.encode_conditions(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), prompts=["x"])
    x, s = torch.randn(1, 64, 48), torch.tensor([0.6])
    return torch.allclose(policy.velocity(x, s, cond, transformer=transformer), policy.velocity(x, s, cond), atol=atol)


SMALL = ["--max_steps", "4", "--logging_steps", "2", "--synthetic_records", "32", "--per_device_train_batch_size", "4"]
LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "8"]


def test_sft_cli_writes_state_and_a_transformer_the_pipeline_loads(tmp_path):
    """The tiny recipe fine-tunes the whole transformer and saves it in diffusers' format."""
    from diffusers import FluxTransformer2DModel

    from refiner_rl.configs import ModelArguments, build_policy

    out = tmp_path / "D"
    r = run_cli(
        ["sft", "--config", os.path.join(ROOT, "recipes/tiny/sft.yaml"), "--output_dir", str(out), *SMALL], tmp_path
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.load(open(out / "trainer_state.json"))
    assert any("loss" in h for h in state["log_history"])
    assert list((out / "wandb").glob("offline-run-*")), "W&B logs offline without an API key, under output_dir"
    pipe = tiny_pipeline(FluxTransformer2DModel.from_pretrained(str(out / "transformer"), use_safetensors=True))
    policy = build_policy(ModelArguments(use_lora=False, transformer_path=str(out / "transformer")))
    assert _same_velocity(policy, pipe.transformer)
    fresh = build_policy(ModelArguments(use_lora=False))
    assert not _same_velocity(fresh, pipe.transformer), "the saved weights are the trained ones, not the random init"


def test_sft_cli_lora_loads_into_the_pipeline(tmp_path):
    from refiner_rl.configs import ModelArguments, build_policy

    out = tmp_path / "D"
    r = run_cli(
        [
            "sft",
            "--config",
            os.path.join(ROOT, "recipes/tiny/sft.yaml"),
            "--output_dir",
            str(out),
            *SMALL,
            *LORA,
            "--report_to",
            "none",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(out))
    policy = build_policy(ModelArguments(lora_r=8, lora_alpha=8, init_lora_path=str(out)))
    assert _same_velocity(policy, pipe.transformer)
    # the pipeline itself runs with the adapter (2 steps, tiny)
    from PIL import Image

    img = pipe(
        image=Image.new("RGB", (32, 32)),
        prompt="restore",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=1.0,
        max_sequence_length=32,
        output_type="pt",
        max_area=32 * 32,
        _auto_resize=False,
    ).images
    assert img.shape[-2:] == (32, 32)


def test_grpo_cli_runs_the_tiny_recipe_from_the_sft_output(tmp_path):
    """The README's two tiny stages, as a user types them (shortened): GRPO reads the SFT transformer."""
    r = run_cli(
        [
            "sft",
            "--config",
            os.path.join(ROOT, "recipes/tiny/sft.yaml"),
            "--output_dir",
            "outputs/tiny-sft",
            *SMALL,
            "--report_to",
            "none",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "G"
    r = run_cli(
        [
            "grpo",
            "--config",
            os.path.join(ROOT, "recipes/tiny/grpo.yaml"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
            "--synthetic_records",
            "8",
            "--per_device_train_batch_size",
            "8",
            "--num_generations",
            "4",
            "--beta",
            "0.01",
            "--report_to",
            "none",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = [h for h in json.load(open(out / "trainer_state.json"))["log_history"] if "reward" in h]
    assert len(logs) == 2
    for name in (
        "reward",
        "reward_std",
        "rewards/masked_pixel/mean",
        "rewards/masked_pixel/std",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "ratio",
    ):
        assert name in logs[0], name
    assert logs[0]["kl"] == 0.0 < logs[1]["kl"], "step 1 starts at the SFT policy (the reference), step 2 has moved"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    r = run_cli(
        [
            "grpo",
            "--config",
            os.path.join(ROOT, "recipes/tiny/grpo.yaml"),
            "--output_dir",
            str(out),
            "--transformer_path",
            str(tmp_path / "missing"),
        ],
        tmp_path,
    )
    assert r.returncode != 0 and "missing" in r.stderr + r.stdout


def test_bad_recipe_key_and_bad_data_fail_clearly(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model_name_or_path: tiny\nlearning_rat: 0.1\n")
    r = run_cli(["sft", "--config", str(bad), "--output_dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 2 and "unknown recipe key(s) learning_rat" in r.stderr
    (tmp_path / "records.jsonl").write_text(
        '{"prompt": "x", "draft": "missing.png", "reference": "missing.png", "target": "t.png"}\n'
    )
    r = run_cli(
        [
            "sft",
            "--config",
            os.path.join(ROOT, "recipes/tiny/sft.yaml"),
            "--output_dir",
            str(tmp_path / "o"),
            "--dataset",
            str(tmp_path / "records.jsonl"),
        ],
        tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1].startswith("refiner-rl sft: error: record 0, field 'draft': file not found")
    )
