"""ReFL with a trained judge as the only reward, from the small SFT editor: held-out judge reward and masked MSE
before and after, with the judge's preference as trained (weight +1) and reversed (weight -1).

The editor, data and trainer settings are those of tests/test_refl_judge.py (``_sft_editor_state``: 200 SFT steps on
64 clean 32 px triplets; ReFL against the frozen SFT editor's sample, from the draft noised to ``--start_sigma``, with
paste-back). Train the judge first, e.g.

    refiner-rl reward-model --config recipes/onereward/judge_reference_tiny.yaml --output_dir /tmp/judge
    OMP_NUM_THREADS=1 python bench/refl_from_judge.py --judge /tmp/judge --seed 0 --lr 3e-4
    OMP_NUM_THREADS=1 python bench/refl_from_judge.py --judge /tmp/judge --seed 0 --lr 3e-4 --noisy   # noisy drafts
    OMP_NUM_THREADS=1 python bench/refl_from_judge.py --judge masked_pixel --seed 0 --lr 3e-4   # the pixel reward

Prints one JSON line. Besides the ReFL runs it measures the judge's *alignment*: at the SFT editor's held-out samples
``x``, the cosine (inside the mask, per image, then averaged) between the gradient of the judge's reward with respect
to ``x`` and ``target - x``, the direction that lowers masked MSE fastest. Even a step in pixel space along the judge's
gradient can lower the masked error by at most a factor ``1 - cos^2`` (to first order), so a ReFL gain of 5% needs a
cosine of 0.22 or more before the editor's own parametrisation takes its share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", required=True, help="a folder written by `refiner-rl reward-model`, or `masked_pixel`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--start_sigma", type=float, default=0.3)
    ap.add_argument("--noisy", action="store_true", help="drafts: the target plus Gaussian noise (std 0.4) in the mask")
    a = ap.parse_args()
    t0 = time.time()
    state, train, held = setup(a)
    out = {"judge": a.judge, "seed": a.seed, "steps": a.steps, "lr": a.lr, "start_sigma": a.start_sigma}
    out["noisy"] = a.noisy
    if a.judge != "masked_pixel":  # the pixel reward's own gradient is the best direction: cosine 1
        out["alignment"] = alignment(a.judge, state, held, a)
    for name, weight in (("preferred", 1.0), ("reversed", -1.0)):
        out[name] = refl_run(a.judge, weight, state, train, held, a)[0]
    out["seconds"] = round(time.time() - t0)
    print(json.dumps(out))


def setup(a):
    """The SFT editor's weights and the ReFL runs' training and held-out triplets, drawn from ``a.seed``."""
    os.environ["REFINER_RL_LEARNING_SEED"] = str(a.seed)  # the tests' helpers read it for their data seeds
    import torch

    from refiner_rl.data import TripletDataset, synthetic_records
    from tests.helpers import data_seeds
    from tests.test_refl_judge import _noisy_drafts, _sft_editor_state

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    state = _sft_editor_state(os.path.join(tempfile.mkdtemp(), "sft"))
    make = _noisy_drafts if getattr(a, "noisy", False) else (lambda n, s: synthetic_records(n, seed=s, size=32))
    train, held = (TripletDataset(make(n, s), None, multiple=4) for s, n in zip(data_seeds(a.seed), (32, 16)))
    return state, train, held


def refl_run(judge: str, weight: float, state: dict, train, held, a) -> tuple[dict, dict]:
    """``a.steps`` ReFL steps from the SFT editor with ``judge`` (a judge folder, or ``masked_pixel``) weighted
    ``weight``: held-out reward and masked MSE before/after, and the editor's weights after."""
    from refiner_rl.rewards.vlm_judge import VLMJudge
    from refiner_rl.scoring.base import BASELINE_FIELD
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import small_policy
    from tests.test_refl_trainer import _config

    policy = small_policy(seed=a.seed)
    policy.transformer.load_state_dict(state)
    if judge == "masked_pixel":
        rewards, config, key = None, [{"name": "masked_pixel"}], "eval_rewards/masked_pixel/mean"
    else:
        rewards = [VLMJudge(backend="local", model_name_or_path=judge, compare_to=BASELINE_FIELD, both_orders=True)]
        config, key = None, "eval_rewards/vlm_judge/mean"
    args = _config(
        tempfile.mkdtemp(), max_steps=a.steps, learning_rate=a.lr, start_sigma=a.start_sigma, rewards=config,
        reward_weights=[weight], reference="frozen", margin=None, seed=a.seed,
    )  # fmt: skip
    trainer = FlowReFLTrainer(policy, rewards, args=args, train_dataset=train, eval_dataset=held)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    mse = "eval_mse_output_in"
    result = {
        "reward": [round(before[key], 4), round(after[key], 4)],
        "masked_mse": [round(before[mse], 5), round(after[mse], 5)],
        "mse_after_over_before": round(after[mse] / before[mse], 4),
        "draft_mse": round(before["eval_mse_draft_in"], 5),
    }
    return result, {k: v.detach().clone() for k, v in policy.transformer.state_dict().items()}


def alignment(judge_folder: str, state: dict, held, a) -> dict:
    """Cosine between the judge's pixel gradient and ``target - x`` at the SFT editor's samples (module docstring)."""
    import torch

    from refiner_rl.evaluation.held_out import reward_columns
    from refiner_rl.evaluation.loop import load_batch
    from refiner_rl.rewards.vlm_judge import VLMJudge
    from refiner_rl.sampling import sample_images
    from refiner_rl.scoring.base import BASELINE_FIELD
    from tests.helpers import small_policy

    policy = small_policy(seed=a.seed)
    policy.transformer.load_state_dict(state)
    batch = load_batch(held, range(len(held)))
    with torch.no_grad():  # the ReFL runs' sampler: 4 steps from the draft noised to start_sigma, paste-back
        x0 = sample_images(policy, batch, num_steps=4, seed=a.seed, start_sigma=a.start_sigma, paste=True)
    judge = VLMJudge(backend="local", model_name_or_path=judge_folder, compare_to=BASELINE_FIELD, both_orders=True)
    x = x0.clone().requires_grad_(True)
    judge.score_tensors(x, {**reward_columns(batch), BASELINE_FIELD: list(x0)}).sum().backward()
    mask = batch["mask"].float()
    cos = torch.nn.functional.cosine_similarity(
        (x.grad * mask).flatten(1), ((batch["target"].float() - x0) * mask).flatten(1), dim=1
    )
    return {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4)}


if __name__ == "__main__":
    main()
