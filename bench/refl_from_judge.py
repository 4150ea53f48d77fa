"""ReFL with a trained judge as the only reward, from the small SFT editor: held-out judge reward and masked MSE
before and after, with the judge's preference as trained (weight +1) and reversed (weight -1).

The editor, data and trainer settings are those of tests/test_refl_judge.py (``_sft_editor_state``: 200 SFT steps on
64 clean 32 px triplets; ReFL against the frozen SFT editor's sample, from the draft noised to ``--start_sigma``, with
paste-back). Train the judge first, e.g.

    refiner-rl reward-model --config recipes/onereward/judge_reference_tiny.yaml --output_dir /tmp/judge
    OMP_NUM_THREADS=1 python bench/refl_from_judge.py --judge /tmp/judge --seed 0 --lr 3e-4
    OMP_NUM_THREADS=1 python bench/refl_from_judge.py --judge /tmp/judge --seed 0 --lr 3e-4 --noisy   # noisy drafts

Prints one JSON line.
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
    ap.add_argument("--judge", required=True, help="a folder written by `refiner-rl reward-model`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--start_sigma", type=float, default=0.3)
    ap.add_argument("--noisy", action="store_true", help="drafts: the target plus Gaussian noise (std 0.4) in the mask")
    a = ap.parse_args()
    os.environ["REFINER_RL_LEARNING_SEED"] = str(a.seed)  # the tests' helpers read it for their data seeds

    import torch

    from refiner_rl.data import TripletDataset, synthetic_records
    from refiner_rl.rewards.vlm_judge import VLMJudge
    from refiner_rl.scoring.base import BASELINE_FIELD
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import data_seeds, small_policy
    from tests.test_refl_judge import _noisy_drafts, _sft_editor_state
    from tests.test_refl_trainer import _config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root, t0 = tempfile.mkdtemp(), time.time()
    state = _sft_editor_state(os.path.join(root, "sft"))
    make = _noisy_drafts if a.noisy else (lambda n, s: synthetic_records(n, seed=s, size=32))
    train, held = (TripletDataset(make(n, s), None, multiple=4) for s, n in zip(data_seeds(a.seed), (32, 16)))
    out = {"judge": a.judge, "seed": a.seed, "steps": a.steps, "lr": a.lr, "start_sigma": a.start_sigma}
    out["noisy"] = a.noisy
    key, mse = "eval_rewards/vlm_judge/mean", "eval_mse_output_in"
    for name, weight in (("preferred", 1.0), ("reversed", -1.0)):
        policy = small_policy(seed=a.seed)
        policy.transformer.load_state_dict(state)
        judge = VLMJudge(backend="local", model_name_or_path=a.judge, compare_to=BASELINE_FIELD, both_orders=True)
        args = _config(
            os.path.join(root, name), max_steps=a.steps, learning_rate=a.lr, start_sigma=a.start_sigma, rewards=None,
            reward_weights=[weight], reference="frozen", margin=None, seed=a.seed,
        )  # fmt: skip
        trainer = FlowReFLTrainer(policy, [judge], args=args, train_dataset=train, eval_dataset=held)
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
        out[name] = {
            "reward": [round(before[key], 4), round(after[key], 4)],
            "masked_mse": [round(before[mse], 5), round(after[mse], 5)],
            "mse_after_over_before": round(after[mse] / before[mse], 4),
            "draft_mse": round(before["eval_mse_draft_in"], 5),
        }
    out["seconds"] = round(time.time() - t0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
