"""ReFL with the OneReward judge: a short run back-propagating the tiny random Qwen2.5-VL judge's pairwise P(Yes)
(x_theta as image A, the reference policy's x_ref as image B) into the editor. Skipped while ``vlm_judge`` has no
differentiable pairwise path against the ``baseline`` column."""

from __future__ import annotations

import math

import pytest
import torch

from refiner_rl.rewards.vlm_judge import VLMJudge
from refiner_rl.scoring.base import BASELINE_FIELD
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
