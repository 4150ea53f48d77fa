"""DiffusionNFT and Advantage Weighted Matching learn on the tiny task, as GRPO does in tests/test_grpo_learning.py
(its settings, rollouts and advantages; only what trains on them differs): the training reward rises, the held-out
masked_pixel reward improves over the starting policy, and negating the reward weight moves it the other way.

The rollout is the ODE sampler (4 steps from the draft noised to sigma 0.6, pasted back outside the mask), each
sample from its own noise; each clean sample is re-noised at 2 times drawn uniformly in [0, 0.6]; per-token
advantages from masked_pixel's 4 px patches (one token each); AdamW without KL, 120 steps; NFT at lr 1e-2 with the
tiny recipe's A_max 0.3 and its adaptive weight; AWM at lr 5e-3 with advantages clipped to +-1 (at lr 1e-2 and +-5
two seeds of five diverged: held-out -87% and -115% after 120 steps; at 80 steps NFT's training trend fell to +1.5%
on one seed). The figures over seeds and kernels are in docs/algorithms.md#learning-tests-hold-on-any-machine.
"""

import pytest

from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
from tests.helpers import LEARNING, learning_figure, learning_run
from tests.test_grpo_learning import SIZE, _mean, _rel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _run(tmp_path, objective: str, sign: float, steps: int) -> dict:
    args = FlowGRPOConfig(
        output_dir=str(tmp_path),
        objective=objective,
        max_steps=steps,
        per_device_train_batch_size=16,
        num_generations=8,
        num_inference_steps=4,
        train_timesteps=2,
        start_sigma=0.6,
        paste_back=True,
        spatial_advantage_mix=1.0,
        learning_rate=1e-2 if objective == "nft" else 5e-3,
        lr_scheduler_type="linear",
        beta=0.0,
        rewards=[{"name": "masked_pixel", "weight": sign, "patch_size": 4}],
        adv_clip_max=0.3 if objective == "nft" else 1.0,  # NFT: recipes/tiny/nft.yaml's A_max
        log_samples=False,
        **LEARNING,
    )
    return learning_run(FlowGRPOTrainer, args, SIZE)


def _trend(logs: list[dict], key: str) -> float:
    """Relative change of a logged value from the first 20% of the steps to the last 20%."""
    vals = [h[key] for h in logs]
    n = len(vals) // 5
    return _rel(_mean(vals[:n]), _mean(vals[-n:]))


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_reward_rises_held_out_improves_and_negated_weights_reverse_it(tmp_path, objective):
    key = "rewards/masked_pixel/mean"  # the raw term (unweighted): the same direction in both runs
    runs = {
        "up": _run(tmp_path / "up", objective, +1.0, steps=120),
        "down": _run(tmp_path / "down", objective, -1.0, 30),
    }
    held_out = {k: _rel(r["before"][key], r["after"][key]) for k, r in runs.items()}
    training = {k: _trend(r["logs"], key) for k, r in runs.items()}
    print(f"{objective}: held-out masked_pixel change {held_out}, training trend {training}")
    assert len(runs["up"]["logs"]) == 120
    # (a) the training reward rises (of |reward|, first 20% of steps vs last 20%); the negated run's falls
    learning_figure(f"{objective}: training reward trend", training["up"], ">", 0.05)
    learning_figure(f"{objective} negated: training reward trend", training["down"], "<", 0.0)
    # (b) held-out: better with the reward, worse with it negated
    # AWM's worst of 10 runs is +5.7% (NFT's +8.9%): its threshold keeps a third of that as a margin
    learning_figure(
        f"{objective}: held-out masked_pixel gain", held_out["up"], ">=", 0.05 if objective == "nft" else 0.035
    )
    learning_figure(f"{objective} negated: held-out masked_pixel gain", held_out["down"], "<=", -0.05)
    down = runs["down"]
    assert down["after"]["reward"] > down["before"]["reward"]  # the negated composite itself rises: it was optimised
