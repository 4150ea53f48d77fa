"""ReFL with the OneReward judge: back-propagating the tiny Qwen2.5-VL judge's pairwise P(Yes) (x_theta as image A,
the reference policy's x_ref as image B) into the editor.

- a random judge: the hinge on two dimensions, with the EMA reference, reaches the LoRA;
- the judge trained by `refiner-rl reward-model` on the tiny recipe (shared with tests/test_onereward_judge_training.py):
  ReFL raises its held-out reward, and with the preference reversed (weight -1) lowers it;
- the same judge from a briefly fine-tuned editor refining noisy drafts (sigma 0.3, paste-back): its reward and the
  held-out masked MSE agree, so the reversed judge worsens the MSE and the judge does not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl.rewards.vlm_judge import VLMJudge
from refiner_rl.scoring.base import BASELINE_FIELD
from tests.helpers import learning_figure
from tests.test_onereward_judge_training import trained_tiny_judge
from tests.test_refl_trainer import _config, _data
from tests.test_rewards_vlm_judge import _build_tiny_judge

pytestmark = pytest.mark.usefixtures("one_thread")


def _judge(folder, dimension: str) -> VLMJudge:
    from refiner_rl.vlm.tiny import PIXELS

    try:
        return VLMJudge(
            backend="local",
            model_name_or_path=str(folder),
            min_pixels=PIXELS,
            max_pixels=PIXELS,
            mode="pairwise",
            compare_to=BASELINE_FIELD,
            task="refine",
            dimension=dimension,
        )
    except ValueError as e:
        if "compare_to" in str(e):
            pytest.skip(f"vlm_judge cannot compare with the refl baseline yet: {e}")
        raise


def test_refl_with_the_pairwise_judge_trains_against_the_reference(tmp_path):
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import small_policy

    if not getattr(VLMJudge, "differentiable", False):
        pytest.skip("vlm_judge has no differentiable path (score_tensors) yet")
    _build_tiny_judge(tmp_path / "judge")
    judges = [_judge(tmp_path / "judge", d) for d in ("detail_fidelity", "consistency")]
    policy = small_policy(lora=True, rank=4)
    before = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    args = _config(
        tmp_path / "run",
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        reference="ema",
        ema_decay=0.5,
        margin=0.9,
    )
    trainer = FlowReFLTrainer(policy, judges, args=args, train_dataset=_data(8), eval_dataset=_data(4, 1))
    # held-out: each judge compares the policy's sample with the reference policy's sample of the same record
    start = trainer.evaluate()
    for label in ("vlm_judge", "vlm_judge_2"):
        assert start[f"eval_rewards/{label}/failed_frac"] == 0.0 and 0 < start[f"eval_rewards/{label}/mean"] < 1
    trainer.train()
    logs = [h for h in trainer.state.log_history if "hinge_active_frac" in h]
    assert len(logs) == 2
    print([{k: round(v, 4) for k, v in h.items() if k.startswith(("rewards/", "loss", "hinge"))} for h in logs])
    for h in logs:
        for dim in ("detail_fidelity", "consistency"):
            p_yes = h[f"rewards/refine/{dim}/mean"]
            assert 0.0 < p_yes < 1.0 and math.isfinite(h["loss"])
    moved = max(
        (p.detach() - before[n]).abs().max().item() for n, p in policy.transformer.named_parameters() if n in before
    )
    assert moved > 0, "the judge's gradient reached the LoRA"
    assert torch.isfinite(trainer._last_samples["x_ref"]).all()


def _judge_run(out, judge_dir: str, weight: float) -> dict:
    """20 ReFL steps of the small random editor (full fine-tuning, frozen reference) on 32 px triplets, with the
    trained judge (both orders) against x_ref as the only reward, weighted ``weight``; held-out metrics before/after."""
    from refiner_rl.data import TripletDataset, synthetic_records
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import LEARNING_SEED, data_seeds, small_policy

    judge = VLMJudge(backend="local", model_name_or_path=judge_dir, compare_to=BASELINE_FIELD, both_orders=True)
    args = _config(
        out, max_steps=20, rewards=None, reward_weights=[weight], reference="frozen", margin=None, seed=LEARNING_SEED
    )
    train, held = (
        TripletDataset(synthetic_records(n, seed=s, size=32), None, multiple=4) for s, n in zip(data_seeds(), (32, 16))
    )
    policy = small_policy(seed=LEARNING_SEED)
    trainer = FlowReFLTrainer(policy, [judge], args=args, train_dataset=train, eval_dataset=held)
    before = trainer.evaluate()
    trainer.train()
    return {"before": before, "after": trainer.evaluate(), "trainer": trainer}


@pytest.fixture(scope="module")
def judge_runs(tmp_path_factory):
    folder, root = trained_tiny_judge(tmp_path_factory), tmp_path_factory.mktemp("refl_judge")
    return {name: _judge_run(root / name, folder, w) for name, w in (("judge", 1.0), ("reversed", -1.0))}


def test_refl_from_the_trained_judge_moves_its_held_out_reward_both_ways(judge_runs):
    key, mse = "eval_rewards/vlm_judge/mean", "eval_mse_output_in"
    for name, run in judge_runs.items():
        b, a = run["before"], run["after"]
        print(f"{name}: held-out judge reward {b[key]:.4f} -> {a[key]:.4f}, masked MSE {b[mse]:.4f} -> {a[mse]:.4f}")
        # before training the policy's held-out sample is the reference's (same weights, same noise): the judge,
        # asked in both orders, compares two equal images
        assert b[key] == pytest.approx(0.5, abs=1e-6) and b["eval_rewards/vlm_judge/failed_frac"] == 0.0
        logs = [h for h in run["trainer"].state.log_history if "hinge_active_frac" in h]
        assert len(logs) == 20 and all(math.isfinite(h["loss"]) for h in logs)
    up, down = judge_runs["judge"], judge_runs["reversed"]
    learning_figure("refl from the judge: held-out reward change", up["after"][key] - up["before"][key], ">=", 0.2)
    learning_figure(
        "refl from the judge, reversed: held-out reward change", down["after"][key] - down["before"][key], "<=", -0.2
    )


def _noisy_drafts(n: int, seed: int, std: float = 0.4) -> list[dict]:
    """32 px synthetic triplets whose draft is the target plus Gaussian noise of ``std`` inside the mask: the flaw
    the tiny judge was trained to rank (its ``noise`` pairs), so less noise is both its preference and a lower MSE."""
    from refiner_rl.data import synthetic_records

    records, rng = synthetic_records(n, seed=seed, size=32), np.random.default_rng(100 + seed)
    for r in records:
        target = np.asarray(r["target"].convert("RGB"), dtype=np.float32) / 255.0
        inside = (np.asarray(r["mask"].convert("L")) > 127)[..., None]
        draft = np.asarray(r["draft"].convert("RGB"), dtype=np.float32) / 255.0
        draft = np.where(inside, target + std * rng.normal(size=target.shape), draft)
        r["draft"] = Image.fromarray(np.round(np.clip(draft, 0.0, 1.0) * 255.0).astype(np.uint8))
    return records


def _sft_editor_state(out) -> dict:
    """The small editor after 200 SFT steps (full fine-tuning) on 64 clean 32 px triplets: it reproduces the draft
    roughly instead of painting colour noise. Its weights, to start each ReFL run from."""
    from refiner_rl.data import TripletDataset, synthetic_records
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer
    from tests.helpers import LEARNING_SEED, QUIET, data_seeds, small_policy

    policy = small_policy(seed=LEARNING_SEED)
    args = FlowSFTConfig(
        output_dir=str(out),
        max_steps=200,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        caption_dropout=0.0,
        sample_steps=0,
        **{**QUIET, "logging_steps": 1000, "seed": LEARNING_SEED},
    )
    records = synthetic_records(64, seed=data_seeds()[0], size=32)
    FlowSFTTrainer(policy, args, TripletDataset(records, None, multiple=4)).train()
    return {k: v.detach().clone() for k, v in policy.transformer.state_dict().items()}


@pytest.fixture(scope="module")
def refined_runs(tmp_path_factory):
    """40 ReFL steps (lr 3e-4, from the draft noised to sigma 0.3, paste-back) of the SFT editor on noisy drafts,
    with the trained judge weighted +1 and -1; held-out metrics on 16 other noisy drafts before/after."""
    from refiner_rl.data import TripletDataset
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import LEARNING_SEED, data_seeds, small_policy

    folder, root = trained_tiny_judge(tmp_path_factory), tmp_path_factory.mktemp("refl_judge_sft")
    state = _sft_editor_state(root / "sft")
    train, held = (TripletDataset(_noisy_drafts(n, s), None, multiple=4) for s, n in zip(data_seeds(), (32, 16)))
    runs = {}
    for name, weight in (("judge", 1.0), ("reversed", -1.0)):
        policy = small_policy(seed=LEARNING_SEED)
        policy.transformer.load_state_dict(state)
        judge = VLMJudge(backend="local", model_name_or_path=folder, compare_to=BASELINE_FIELD, both_orders=True)
        args = _config(
            root / name,
            max_steps=40,
            learning_rate=3e-4,
            start_sigma=0.3,
            rewards=None,
            reward_weights=[weight],
            reference="frozen",
            margin=None,
            seed=LEARNING_SEED,
        )
        trainer = FlowReFLTrainer(policy, [judge], args=args, train_dataset=train, eval_dataset=held)
        before = trainer.evaluate()
        trainer.train()
        runs[name] = {"before": before, "after": trainer.evaluate()}
    return runs


def test_refl_from_a_fine_tuned_editor_reversed_judge_raises_the_masked_mse_judge_does_not(refined_runs):
    key, mse = "eval_rewards/vlm_judge/mean", "eval_mse_output_in"
    for name, run in refined_runs.items():
        b, a = run["before"], run["after"]
        print(f"{name}: held-out judge reward {b[key]:.4f} -> {a[key]:.4f}, masked MSE {b[mse]:.4f} -> {a[mse]:.4f}")
    up, down = refined_runs["judge"], refined_runs["reversed"]
    start = up["before"]
    assert down["before"][mse] == pytest.approx(start[mse]) and start[mse] < start["eval_mse_draft_in"]
    tuned = "refl from the judge, SFT editor"
    learning_figure(f"{tuned}: held-out reward change", up["after"][key] - start[key], ">=", 0.15)
    learning_figure(f"{tuned}, reversed: held-out reward change", down["after"][key] - start[key], "<=", -0.04)
    learning_figure(f"{tuned}, reversed: masked MSE after / before", down["after"][mse] / start[mse], ">=", 1.03)
    learning_figure(f"{tuned}: masked MSE after / before", up["after"][mse] / start[mse], "<=", 1.02)
    assert up["after"][mse] < down["after"][mse]
