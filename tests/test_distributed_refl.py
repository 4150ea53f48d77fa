"""ReFL under DeepSpeed ZeRO-2 on a CPU: two processes train exactly like one.

    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 2 --main_process_port <free> \\
        -m refiner_rl refl --config recipes/onereward/refl_tiny.yaml --max_steps 2 ...

against ``python -m refiner_rl refl ...`` on one process with the same global batch (8) and seed, with the EMA
reference (its swap into the DeepSpeed-held module is part of what is compared): the logged loss, grad norm and
reward, and the saved LoRA. Every draw is keyed by seed, step and record (task and t by step), so the split 4 + 4
sees the noise of the one process's 8. The launch helpers are tests/test_distributed.py's.
"""

from __future__ import annotations

import os

import pytest

from tests import test_distributed as dist
from tests.test_distributed import LOSS_ATOL, assert_same_logs, assert_same_weights, launch

REFL_RECIPE = os.path.join(dist.ROOT, "recipes", "onereward", "refl_tiny.yaml")
ARGS = (
    "--max_steps",
    "2",
    "--logging_steps",
    "1",
    "--synthetic_records",
    "16",
    "--transformer_path",
    "",
    "--reference",
    "ema",
    "--ema_decay",
    "0.5",
    "--learning_rate",
    "1e-2",
    "--save_strategy",
    "no",
    "--sample_steps",
    "0",
    "--log_samples",
    "false",
    "--adam_epsilon",
    "1e-6",  # as the GRPO runs there: Adam's 1e-8 turns round-off on ~1e-8 gradients into ~1e-5 weight changes
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-refl")
    # launch() takes the recipe of any stage other than sft from this module global
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "GRPO_RECIPE", REFL_RECIPE)
        for mode in ("1p", "zero2"):
            launch("refl", mode, root / mode, *ARGS)
    return root


def test_refl_zero2_on_two_processes_matches_one(runs):
    one, two = runs / "1p", runs / "zero2"
    assert_same_logs(one, two, rel=("grad_norm",), absolute={"loss": LOSS_ATOL, "reward": LOSS_ATOL})
    assert_same_weights(one, two)
