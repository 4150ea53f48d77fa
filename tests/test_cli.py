"""The CLI, launched the way a user launches it."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd, timeout=900):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "refiner_rl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("sft", "grpo", "demo", "rewards"))
    r = run_cli(["trian"], tmp_path)
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr


def test_sft_cli_writes_state_and_a_lora_the_pipeline_loads(tmp_path):
    out = tmp_path / "D"
    r = run_cli(["sft", "--config", os.path.join(ROOT, "recipes/tiny/sft.yaml"), "--output_dir", str(out),
                 "--max_steps", "4", "--logging_steps", "2", "--synthetic_records", "32", "--per_device_train_batch_size", "4"],
                tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.load(open(out / "trainer_state.json"))
    assert any("loss" in h for h in state["log_history"])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B logs offline without an API key"

    # the LoRA loads into a FluxKontextPipeline built from the tiny components, and reproduces the policy
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from refiner_rl.configs import ModelArguments, build_policy
    from refiner_rl.policies.tiny import tiny_components

    c = tiny_components()
    vae = AutoencoderKL(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=12, norm_num_groups=1,
                        layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0)  # fmt: skip
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=c["text_encoder"],
                               tokenizer=c["tokenizer"], text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"],
                               transformer=c["transformer"])  # fmt: skip
    pipe.load_lora_weights(str(out))
    import yaml

    recipe = yaml.safe_load(open(os.path.join(ROOT, "recipes/tiny/sft.yaml")))
    policy = build_policy(ModelArguments(lora_r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"],
                                         lora_target_modules=recipe["lora_target_modules"], init_lora_path=str(out)))  # fmt: skip
    cond = policy.encode_conditions(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), prompts=["x"])
    x, s = torch.randn(1, 64, 48), torch.tensor([0.6])
    assert torch.allclose(policy.velocity(x, s, cond, transformer=pipe.transformer), policy.velocity(x, s, cond), atol=1e-5)
    # the pipeline itself runs with the adapter (2 steps, tiny)
    from PIL import Image

    img = pipe(image=Image.new("RGB", (32, 32)), prompt="restore", num_inference_steps=2, height=32, width=32,
               guidance_scale=1.0, max_sequence_length=32, output_type="pt", max_area=32 * 32, _auto_resize=False).images  # fmt: skip
    assert img.shape[-2:] == (32, 32)


def test_bad_recipe_key_and_bad_data_fail_clearly(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model_name_or_path: tiny\nlearning_rat: 0.1\n")
    r = run_cli(["sft", "--config", str(bad), "--output_dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode != 0 and "learning_rat" in (r.stderr + r.stdout)
    (tmp_path / "records.jsonl").write_text('{"prompt": "x", "draft": "missing.png", "reference": "missing.png", "target": "t.png"}\n')
    r = run_cli(["sft", "--config", os.path.join(ROOT, "recipes/tiny/sft.yaml"), "--output_dir", str(tmp_path / "o"),
                 "--dataset", str(tmp_path / "records.jsonl")], tmp_path)  # fmt: skip
    assert r.returncode != 0 and "record 0, field 'draft': file not found" in (r.stderr + r.stdout)
