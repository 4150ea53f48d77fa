"""The TRL-shaped surface of GRPO: ``FlowGRPOTrainer(model, reward_funcs, args, train_dataset, peft_config)`` with
plain reward functions (by dotted path in a recipe, as callables, async), samples no reward could score left out
(never 0), a reward that always fails stopping the run with a checkpoint, and a config that refuses TRL options
that mean nothing for images."""

import os
import subprocess
import sys

import pytest
import torch

from refiner_rl.errors import ConfigError, RewardError
from refiner_rl.scoring import to_pil
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
from tests import reward_functions as rf
from tests.helpers import QUIET, SMALL, small_policy, synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    per_device_train_batch_size=2,
    num_generations=2,
    num_inference_steps=3,
    sde_window_size=1,
    beta=0.0,
    learning_rate=1e-3,
    **QUIET,
)


def _args(tmp_path, **kw) -> FlowGRPOConfig:
    return FlowGRPOConfig(output_dir=str(tmp_path), **{**TINY, **kw})


def _reward_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "reward" in h]


def test_plain_functions_by_dotted_path_in_a_recipe_train_and_unscored_samples_are_left_out(tmp_path):
    from refiner_rl.cli.train import parse_recipe
    from refiner_rl.configs import DataArguments, ModelArguments, build_policy

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\n"
        f"tiny_model: {dict(SMALL, axes_dims_rope=list(SMALL['axes_dims_rope']))}\n"
        "use_lora: true\nlora_r: 4\n"
        "dataset: synthetic\nsynthetic_records: 4\nsynthetic_size: 16\n"
        "rewards:\n"
        "  - {name: tests.reward_functions.brightness, weight: 0.5}\n"
        "  - {name: 'tests.reward_functions:odd_records_only'}\n"
        "max_steps: 3\nper_device_train_batch_size: 4\nnum_generations: 2\nnum_inference_steps: 3\n"
        "sde_window_size: 1\nbeta: 0.0\nlogging_steps: 1\nsave_strategy: 'no'\nreport_to: none\n"
        "use_cpu: true\ndisable_tqdm: true\n"
    )
    model_args, data_args, args = parse_recipe(
        (ModelArguments, DataArguments, FlowGRPOConfig), ["--config", str(recipe), "--output_dir", str(tmp_path / "o")]
    )
    assert args.rewards == [
        {"name": "tests.reward_functions.brightness"},
        {"name": "tests.reward_functions:odd_records_only"},
    ]
    assert args.reward_weights == [0.5, 1.0]  # `weight:` moved into TRL's reward_weights
    policy = build_policy(model_args)
    trainer = FlowGRPOTrainer(policy, args=args, train_dataset=data_args.build(multiple=4))
    assert trainer.reward_names == ["brightness", "odd_records_only"]
    trainer.train()
    logs = _reward_logs(trainer)
    assert len(logs) == 3
    for h in logs:
        assert h["rewards/brightness/failed_frac"] == 0.0
        assert h["rewards/odd_records_only/failed_frac"] > 0.0  # even records: None, excluded
        assert 0.0 < h["rewards/brightness/mean"] < 1.0
    # by hand on the last rollout: the total weighs brightness 0.5 and adds odd_records_only only where it scored
    s = trainer._last_samples
    b = torch.tensor(rf.brightness(None, [to_pil(im) for im in s["images"]]))
    odd = s["batch"]["index"] % 2 == 1
    expected = 0.5 * b + torch.where(odd, b, torch.zeros_like(b))
    assert torch.allclose(s["total"].double(), expected.double(), atol=1e-5)
    assert logs[-1]["reward"] == pytest.approx(expected.mean().item(), abs=1e-5)


def test_callables_and_an_async_function_train_in_python(tmp_path):
    rf.CALLS["async_brightness"].clear()
    steps = 2
    trainer = FlowGRPOTrainer(
        small_policy(lora=True, rank=4),
        [rf.brightness, rf.async_brightness],
        args=_args(tmp_path, max_steps=steps, reward_weights=[1.0, -1.0]),
        train_dataset=synthetic_dataset(4, size=16),
    )
    trainer.train()
    assert rf.CALLS["async_brightness"] == [0, 1]  # one call per rollout, with TRL's trainer_state
    logs = _reward_logs(trainer)
    assert len(logs) == 2
    for h in logs:  # the same function, sync and async, on the same images; weights +1 and -1 cancel
        assert h["rewards/async_brightness/mean"] == pytest.approx(h["rewards/brightness/mean"], abs=1e-7)
        assert h["reward"] == pytest.approx(0.0, abs=1e-6)
    held_out = trainer.evaluate(synthetic_dataset(2, seed=1, size=16))  # the one evaluator, same weights
    assert held_out["eval_reward"] == pytest.approx(0.0, abs=1e-6) and "epoch" not in held_out
    assert rf.CALLS["async_brightness"][-1] == steps  # evaluation passes trainer_state too
    assert held_out["eval_rewards/async_brightness/mean"] == pytest.approx(held_out["eval_rewards/brightness/mean"])
    assert held_out["eval_mse_output_in"] > 0


def test_a_reward_that_always_fails_stops_the_run_with_a_checkpoint(tmp_path):
    trainer = FlowGRPOTrainer(
        small_policy(lora=True, rank=4),
        [rf.brightness, rf.always_fails],
        args=_args(tmp_path, max_steps=10, max_failed_reward_steps=2),
        train_dataset=synthetic_dataset(4, size=16),
    )
    with pytest.raises(RewardError, match=r"always_fails .*2 consecutive rollouts.*RuntimeError: scorer offline"):
        trainer.train()
    # rollouts at steps 0 and 1 failed: the run stopped after one optimizer step and saved it
    assert trainer.state.global_step == 1
    ckpt = tmp_path / "checkpoint-1"
    for f in ("pytorch_lora_weights.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (ckpt / f).is_file(), f


def test_trl_options_without_meaning_for_images_are_refused_by_name(tmp_path):
    for key, value in [
        ("use_vllm", True),
        ("temperature", 0.7),
        ("vllm_mode", "server"),
        ("max_completion_length", 64),
    ]:
        with pytest.raises(ConfigError, match=f"`{key}: "):
            _args(tmp_path, rewards=["masked_pixel"], **{key: value})
    with pytest.raises(ConfigError, match="loss_type: cispo"):
        _args(tmp_path, loss_type="cispo")
    assert _args(tmp_path, loss_type="dr_grpo").loss_type == "dr_grpo"  # the same mean for images: accepted
    assert [_args(tmp_path, scale_rewards=v).scale_rewards for v in (True, False, "false", "batch")] == [
        "group",
        "none",
        "none",
        "batch",
    ]
    with pytest.raises(ConfigError, match="scale_rewards"):
        _args(tmp_path, scale_rewards="sometimes")
    with pytest.raises(ConfigError, match="not both"):
        _args(tmp_path, rewards=[{"name": "masked_pixel", "weight": 2.0}], reward_weights=[1.0])
    assert _args(tmp_path, rewards=["masked_pixel"], reward_weights=[3.0]).reward_weights == [3.0]


def test_a_model_name_and_a_peft_config(tmp_path):
    from peft import LoraConfig

    trainer = FlowGRPOTrainer(
        "tiny",
        ["masked_pixel"],
        args=_args(tmp_path),
        train_dataset=synthetic_dataset(4, size=16),
        peft_config=LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]),
    )
    assert trainer.policy.has_lora
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and (".to_q." in n or ".to_v." in n) for n in trained)
    with pytest.raises(ConfigError, match="already has a LoRA"):
        FlowGRPOTrainer(trainer.policy, ["masked_pixel"], args=_args(tmp_path), peft_config=LoraConfig(r=2))


def test_evaluate_leaves_out_samples_no_reward_scored(tmp_path):
    from refiner_rl.distributed import keyed_generator
    from refiner_rl.evaluation import SamplerSettings, evaluate
    from refiner_rl.sampling import sample_images
    from refiner_rl.scoring import build_reward_funcs

    policy, ds = small_policy(), synthetic_dataset(4, size=16)
    res = evaluate(
        policy, ds, SamplerSettings(num_steps=2), batch_size=4, rewards=build_reward_funcs([rf.odd_records_only])
    )
    from refiner_rl.data import collate_triplets

    batch = collate_triplets([ds[i] for i in range(4)])
    gens = [keyed_generator(0, i) for i in range(4)]  # evaluate keys each record's noise by (seed, record)
    images = sample_images(policy, batch, num_steps=2, generators=gens, micro_batch=4)
    b = torch.tensor(rf.brightness(None, [to_pil(im) for im in images]))
    odd = batch["index"] % 2 == 1
    assert res["rewards/odd_records_only/failed_frac"] == 0.5
    assert res["reward_failed_frac"] == 0.5
    assert res["reward"] == pytest.approx(b[odd].mean().item(), abs=1e-6)  # not (sum of odd) / 4
    assert res["mse_output_in"] > 0 and res["mse_draft_in"] > 0


def test_import_refiner_rl_is_cheap_and_exports_the_public_classes():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, refiner_rl; print('torch' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.split() == ["False", "False"]
    import refiner_rl
    from refiner_rl.data import TripletDataset
    from refiner_rl.policies import KontextPolicy

    assert refiner_rl.FlowGRPOTrainer is FlowGRPOTrainer and refiner_rl.KontextPolicy is KontextPolicy
    assert refiner_rl.TripletDataset is TripletDataset
    for name in ("FlowGRPOConfig", "FlowSFTTrainer", "FlowSFTConfig", "ModelArguments", "DataArguments", "Reward"):
        assert getattr(refiner_rl, name).__name__ == name
    assert callable(refiner_rl.register_reward)


def test_defaults_and_the_sft_trainer_takes_the_same_arguments(tmp_path, monkeypatch):
    from peft import LoraConfig

    from refiner_rl.trainers.sft_config import FlowSFTConfig
    from refiner_rl.trainers.sft_trainer import FlowSFTTrainer

    monkeypatch.chdir(tmp_path)
    trainer = FlowGRPOTrainer(small_policy(), rf.brightness)  # TRL's defaults: a config named after the model
    assert trainer.args.output_dir == "refiner-GRPO" and trainer.reward_weights.tolist() == [1.0]
    with pytest.raises(ConfigError, match="no rewards"):
        FlowGRPOTrainer(small_policy(), args=_args(tmp_path))
    sft = FlowSFTTrainer(
        small_policy(),
        args=FlowSFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True),
        train_dataset=synthetic_dataset(4, size=16),
        peft_config=LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]),
    )
    assert sft.policy.has_lora and sft.model is sft.policy.transformer
    assert all(".to_k.lora_" in n for n, p in sft.model.named_parameters() if p.requires_grad)


def test_a_non_finite_velocity_stops_the_rollout_with_one_line_naming_the_step(tmp_path, monkeypatch):
    from refiner_rl.errors import NumericsError

    policy = small_policy(lora=True)
    calls, velocity = [], policy.velocity

    def nan_from_the_third_call(x, sigma, cond, **kw):
        calls.append(float(sigma[0]))
        v = velocity(x, sigma, cond, **kw).clone()
        if len(calls) >= 3:
            v[:, 0] = float("nan")  # the first token of every sample
        return v

    monkeypatch.setattr(policy, "velocity", nan_from_the_third_call)
    trainer = FlowGRPOTrainer(
        policy, [rf.brightness], args=_args(tmp_path, max_steps=1), train_dataset=synthetic_dataset(2, size=16)
    )
    with pytest.raises(NumericsError) as err:
        trainer.train()
    msg = str(err.value)
    assert msg.startswith(f"rollout step 2 (sigma {calls[2]:.4f} -> ") and "\n" not in msg
    assert "non-finite in " in msg and "attention backend native" in msg and "torch.float32" in msg
