"""Resume (DanceGRPO's and MixGRPO's resume is a silent no-op): N steps + resume + N steps logs the same metrics
and ends with the same LoRA and EMA weights as 2N uninterrupted steps, with a sliding SDE window, EMA, a
rollout reused for two updates and a resume on an epoch boundary. Checkpoints are written atomically."""

import os

import pytest
import torch

from refiner_rl.errors import CheckpointError
from refiner_rl.trainers.ema import EMA_FILE
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import EMA_DIR, FlowGRPOTrainer
from tests.helpers import small_policy, synthetic_dataset

N = 4  # optimizer steps before the resume; with 4 records and 2 per rollout, one epoch = 4 steps

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingTrainer(FlowGRPOTrainer):
    """Records which rollout used which SDE window."""

    def _generate_and_score(self, batch):
        out = super()._generate_and_score(batch)
        self.windows = getattr(self, "windows", []) + [(self.rollout_index, tuple(out["sde_steps"]))]
        return out


def _trainer(out_dir) -> FlowGRPOTrainer:
    args = FlowGRPOConfig(
        output_dir=str(out_dir),
        max_steps=2 * N,
        save_strategy="steps",
        save_steps=N,
        logging_steps=1,
        per_device_train_batch_size=2,
        steps_per_generation=2,
        num_generations=2,  # one rollout, two updates
        num_inference_steps=4,
        sde_window_size=1,
        sde_window_mode="sliding",  # windows 0, 1, 2, 0, ...
        learning_rate=3e-3,
        beta=0.05,
        epsilon=1e-3,
        ema_decay=0.5,
        seed=0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        rewards=[{"name": "masked_pixel", "weight": 1.0}, {"name": "masked_pixel", "region": "outside", "weight": 0.5}],
    )
    return RecordingTrainer(small_policy(lora=True), args=args, train_dataset=synthetic_dataset(4, size=16))


def _logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def test_resume_continues_exactly(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    ckpts = sorted(os.listdir(tmp_path / "full"))
    assert ckpts == [f"checkpoint-{N}", f"checkpoint-{2 * N}"], ckpts  # no leftover .tmp-* folder
    ck = tmp_path / "full" / f"checkpoint-{N}"
    for f in (
        "pytorch_lora_weights.safetensors",
        EMA_FILE,
        f"{EMA_DIR}/pytorch_lora_weights.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    ):
        assert (ck / f).is_file(), f
    assert not [f for f in os.listdir(ck) if f.endswith(".tmp")]
    assert [w for _, w in full.windows] == [(0,), (1,), (2,), (0,)]  # sliding window, one rollout per 2 steps

    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ck))
    assert resumed.windows == full.windows[2:]  # window position continues where it stopped

    a, b = _logs(full)[N:], _logs(resumed)[N:]  # the resumed history starts with the checkpoint's
    assert len(a) == len(b) == N and [h["step"] for h in b] == [h["step"] for h in a] == list(range(N + 1, 2 * N + 1))
    keys = [
        "loss",
        "reward",
        "reward_std",
        "rewards/masked_pixel/mean",
        "rewards/masked_pixel_2/mean",
        "kl",
        "ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "grad_norm",
        "learning_rate",
    ]
    for ha, hb in zip(a, b):
        assert ha.keys() == hb.keys()
        for k in [k for k in keys if k in ha]:  # reward metrics come with the rollout's first update
            assert hb[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-7), (ha["step"], k, ha[k], hb[k])
    # the second update of each rollout is off-policy: the ratio moved, so the clip metrics were live
    assert any(abs(h["ratio"] - 1) > 1e-7 for h in a)

    w_full, w_res = full.policy.lora_state_dict(), resumed.policy.lora_state_dict()
    assert w_full.keys() == w_res.keys()
    assert all(torch.allclose(w_full[k], w_res[k], atol=1e-6) for k in w_full)
    e_full, e_res = full.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.allclose(e_full[k], e_res[k], atol=1e-6) for k in e_full)
    # and the EMA really lags the live weights
    live = dict(full.model.named_parameters())
    assert any(not torch.allclose(e_full[k], live[k].float()) for k in e_full)


def test_missing_ema_state_on_resume_says_what_to_do(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.args.max_steps = N
    trainer.train()
    ck = tmp_path / "run" / f"checkpoint-{N}"
    os.remove(ck / EMA_FILE)
    again = _trainer(tmp_path / "run2")
    with pytest.raises(CheckpointError, match="same ema_decay"):
        again.train(resume_from_checkpoint=str(ck))
