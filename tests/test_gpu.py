"""The GPU paths: the tiny stages on CUDA in bf16, launched as a user launches them, and the sampler's CPU/CUDA
parity. Skipped where no CUDA device is present (CI has none); run them on a GPU machine with
``python -m pytest -q tests/test_gpu.py``."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from refiner_rl.evaluation.loop import load_batch
from tests.helpers import small_policy, synthetic_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GPU = ["--use_cpu", "false", "--report_to", "none", "--disable_tqdm", "true"]


def run_cli(args, cwd, timeout=600):
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)
    r = subprocess.run(
        [sys.executable, "-m", "refiner_rl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def logged(out_dir, key):
    history = json.load(open(os.path.join(out_dir, "trainer_state.json")))["log_history"]
    return [h[key] for h in history if key in h]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """The tiny SFT recipe on the GPU (bf16 by default there), 120 steps."""
    root = tmp_path_factory.mktemp("gpu")
    out = root / "sft"
    recipe = os.path.join(ROOT, "recipes/tiny/sft.yaml")
    run_cli(["sft", "--config", recipe, "--output_dir", str(out), "--max_steps", "120", *ON_GPU], root)
    return out


def test_sft_learns_on_cuda_in_bf16(sft_dir):
    losses = logged(sft_dir, "loss")
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_policy_objectives_run_on_cuda(sft_dir, objective, dtype, tmp_path):
    """Rollouts, rewards, advantages, the objective's step and a checkpoint, in bf16 (the GPU default: bf16 weights and
    autocast) and in fp32."""
    recipe = "tiny/grpo.yaml" if objective == "grpo" else "tiny/nft.yaml"
    precision = ["--torch_dtype", dtype, "--bf16", str(dtype == "bfloat16").lower()]
    out = tmp_path / objective
    run_cli(
        [
            *("grpo", "--config", os.path.join(ROOT, "recipes", recipe), "--output_dir", str(out)),
            *("--transformer_path", str(sft_dir / "transformer"), "--max_steps", "6", "--logging_steps", "1"),
            *("--save_steps", "6", *precision),
            *ON_GPU,
        ],
        tmp_path,
    )
    rewards = logged(out, "reward")
    assert len(rewards) == 6 and all(torch.isfinite(torch.tensor(rewards))), rewards
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-6").is_dir()


@pytest.mark.parametrize("reference", ["frozen", "ema"])
def test_refl_runs_on_cuda(sft_dir, reference, tmp_path):
    out = tmp_path / reference
    run_cli(
        [
            *("refl", "--config", os.path.join(ROOT, "recipes/onereward/refl_tiny.yaml"), "--output_dir", str(out)),
            *("--transformer_path", str(sft_dir / "transformer"), "--max_steps", "6", "--logging_steps", "1"),
            *("--reference", reference, "--save_steps", "6", "--sample_steps", "0"),
            *ON_GPU,
        ],
        tmp_path,
    )
    losses = logged(out, "loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_eval_command_on_cuda(sft_dir, tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\ndataset: synthetic\nsynthetic_eval_records: 16\nsynthetic_size: 32\n"
        f"candidates:\n  - {{name: draft, checkpoint: draft}}\n  - {{name: sft, checkpoint: {sft_dir}}}\n"
        "metrics:\n  - {name: masked_mse, region: inside}\n  - {name: masked_psnr, region: inside}\n"
        f"num_inference_steps: 6\nseed: 0\nbatch_size: 8\noutput_dir: {tmp_path / 'eval'}\nreport_to: none\n"
    )
    run_cli(["eval", "--config", str(recipe)], tmp_path)
    summary = json.load(open(tmp_path / "eval" / "results.json"))["summary"]
    sft = summary["sft"]["mse_in"]
    assert sft["n"] == 16 and math.isfinite(sft["mean"]), sft  # bf16 sampling without gradients gives finite images
    assert sft["mean"] < summary["draft"]["mse_in"]["mean"] * 10, summary  # and sane ones (the SFT had 120 steps)


def test_bf16_sampling_on_cuda_is_finite():
    """No-gradient sampling with bf16 weights on CUDA (what GRPO rollouts and evaluation do) gives finite images."""
    from refiner_rl.sampling import sample_images

    policy = small_policy().to("cuda")
    policy.transformer.to(torch.bfloat16)
    policy.dtype = torch.bfloat16
    batch = load_batch(synthetic_dataset(8, seed=1, size=32), range(8))
    images = sample_images(policy, batch, num_steps=4, seed=0)
    assert torch.isfinite(images).all()


def test_sampler_matches_between_cpu_and_cuda():
    """The same policy and noise give the same held-out figures on both devices (fp32): noise is drawn on the CPU."""
    from refiner_rl.evaluation import SamplerSettings, evaluate

    held_out = synthetic_dataset(16, seed=1, size=32)
    policy = small_policy()
    policy.transformer.eval()
    cpu = evaluate(policy, held_out, SamplerSettings(num_steps=6))
    policy.to("cuda")
    cuda = evaluate(policy, held_out, SamplerSettings(num_steps=6))
    assert cuda["mse_output_in"] == pytest.approx(cpu["mse_output_in"], rel=1e-3)
    assert cuda["mse_output_out"] == pytest.approx(cpu["mse_output_out"], rel=1e-3)
