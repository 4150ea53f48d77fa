"""DiffusionNFT under ZeRO-2: two processes train exactly like one (the NFT analogue of tests/test_distributed.py's
GRPO comparison, with its launch helpers and tolerances).

A tiny SFT LoRA is trained on one process, then one NFT step of one group of 8 (split 4 + 4 over two processes)
starts from it on one process and under ``recipes/accelerate/zero2.yaml``: the logged reward, loss, KL (the
velocity gap to the reference) and grad norm agree, and so do the saved LoRA weights. Each sample's ODE noise, its
re-noising times and noises are keyed by what the sample is, and rewards are gathered before group advantages, so
the split does not change what is trained.
"""

from __future__ import annotations

import pytest

from tests.test_distributed import SFT_ARGS, _grpo_args, _history, assert_same_logs, assert_same_weights, launch

pytestmark = pytest.mark.slow

# The GRPO overrides of tests/test_distributed.py, then NFT's (later flags win): ODE rollouts with each sample its
# own noise, two re-noised times per sample.
NFT_ARGS = ("--objective", "nft", "--shared_initial_noise", "false", "--train_timesteps", "2", "--max_steps", "1")


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("nft-dist") / "sft"
    launch("sft", "1p", out, *SFT_ARGS, "--save_strategy", "no")
    return out


def test_nft_step_on_two_zero2_processes_matches_one(sft_lora, tmp_path):
    one, two = tmp_path / "nft-1p", tmp_path / "nft-zero2"
    launch("grpo", "1p", one, *_grpo_args(str(sft_lora)), *NFT_ARGS)
    launch("grpo", "zero2", two, *_grpo_args(str(sft_lora)), *NFT_ARGS)
    first = _history(one)[0]
    assert first["kl"] > 0 and first["grad_norm"] > 1e-6, "started from the SFT LoRA: the update is not trivial"
    assert_same_logs(one, two, rel=("reward", "reward_std", "kl", "grad_norm", "loss"))
    assert_same_weights(one, two)
    assert_same_weights(one / "ema", two / "ema")  # the EMA (ema_decay 0.5 in the GRPO overrides)
