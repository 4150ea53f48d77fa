"""The tiny FLUX.1-Fill editor trains under DeepSpeed ZeRO-2 exactly like on one process: GRPO and NFT (2 steps each) on
mask-guided task records (fill, extend, removal), one group of 8 split 4 + 4 over two processes, with the launch
helpers and tolerances of tests/test_distributed.py."""

from __future__ import annotations

import pytest

from tests.test_distributed import LOSS_ATOL, _grpo_args, _history, assert_same_logs, assert_same_weights, launch

pytestmark = pytest.mark.slow

FILL_ARGS = (
    "--model_name_or_path",
    "tiny-fill",
    "--synthetic_tasks",
    '{"fill": 0.5, "extend": 0.25, "removal": 0.25}',
    "--synthetic_size",
    "16",
    "--start_sigma",
    "1.0",
)
NFT_ARGS = ("--objective", "nft", "--shared_initial_noise", "false", "--train_timesteps", "2")


@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_fill_on_two_zero2_processes_matches_one(objective, tmp_path):
    extra = FILL_ARGS + (NFT_ARGS if objective == "nft" else ())
    one, two = tmp_path / "1p", tmp_path / "zero2"
    launch("grpo", "1p", one, *_grpo_args(""), *extra)
    launch("grpo", "zero2", two, *_grpo_args(""), *extra)
    history = _history(one)
    assert len(history) == 2
    assert history[-1]["grad_norm"] > 1e-6, "a fresh LoRA still gets a gradient: the update is not trivial"
    # the loss sits near 0 (ratio 1, advantages of mean 0 per group): compared absolutely, as SFT's is
    assert_same_logs(one, two, rel=("reward", "reward_std", "grad_norm"), absolute={"loss": LOSS_ATOL})
    assert_same_weights(one, two)
