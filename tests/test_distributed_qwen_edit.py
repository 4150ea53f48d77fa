"""The tiny Qwen-Image-Edit Plus editor trains under DeepSpeed ZeRO-3 exactly like on one process: GRPO and NFT (2 steps
each) on two-reference synthetic records, one group of 8 split 4 + 4 over two processes, with the launch helpers and
tolerances of tests/test_distributed.py (as tests/test_distributed_fill.py does for FLUX.1-Fill under ZeRO-2)."""

from __future__ import annotations

import pytest

from refiner_rl.policies.qwen_edit import QWEN_LORA_TARGETS
from tests.test_distributed import LOSS_ATOL, _grpo_args, _history, assert_same_logs, assert_same_weights, launch

pytestmark = pytest.mark.slow

QWEN_ARGS = (
    "--model_name_or_path",
    "tiny-qwen-edit",
    "--synthetic_references",
    "2",
    "--synthetic_size",
    "16",
    "--start_sigma",
    "1.0",
    "--lora_target_modules",
    *QWEN_LORA_TARGETS,
)
NFT_ARGS = ("--objective", "nft", "--shared_initial_noise", "false", "--train_timesteps", "2")


@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_qwen_edit_on_two_zero3_processes_matches_one(objective, tmp_path):
    extra = QWEN_ARGS + (NFT_ARGS if objective == "nft" else ())
    one, two = tmp_path / "1p", tmp_path / "zero3"
    launch("grpo", "1p", one, *_grpo_args(""), *extra)
    launch("grpo", "zero3", two, *_grpo_args(""), *extra)
    history = _history(one)
    assert len(history) == 2
    assert history[-1]["grad_norm"] > 1e-6, "a fresh LoRA still gets a gradient: the update is not trivial"
    assert_same_logs(one, two, rel=("reward", "reward_std", "grad_norm"), absolute={"loss": LOSS_ATOL})
    assert_same_weights(one, two)
