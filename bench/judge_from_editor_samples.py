"""Judges trained on the small SFT editor's own samples, then ReFL from them (bench/refl_from_judge.py's runs).

Two ways to give the tiny judge the images ReFL will show it, both labelled by the masked MSE to the target (what a
human rater's preference stands in for here), a pair kept when one candidate's error is at least 15% above the
other's, the preferred image first in every other pair:

- ``--mode editor``: per record, the SFT editor's samples (3 noise draws, the ReFL runs' sampler) and, for two of
  them, the sample moved halfway and all the way to the target inside the mask; 4 pairs per record of 128 records
  (and 32 held-out records for the judge's accuracy). The judge learns these pairs alone (200 steps of
  judge_reference_tiny.yaml's settings).
- ``--mode adversarial``: the judge of judge_reference_tiny.yaml with ``noise`` pairs added (512 synthetic pairs,
  300 steps), then ``--rounds`` rounds: ReFL from the current judge, and the judge retrained from scratch with
  pairs of the SFT editor's samples, the fooled editor's samples and the target added (4 per record of 128 records
  per round).

    OMP_NUM_THREADS=1 python bench/judge_from_editor_samples.py --mode editor --lr 3e-4
    OMP_NUM_THREADS=1 python bench/judge_from_editor_samples.py --mode adversarial --rounds 2 --lr 1e-3

Prints one JSON line per judge: its alignment (bench/refl_from_judge.py) and the ReFL runs both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refl_from_judge import alignment, refl_run, setup  # noqa: E402


def candidates(states: list[dict], records: list[dict], seed: int, moves=(0.5, 1.0), draws: int = 3):
    """Per record, the samples of every editor in ``states`` (``draws`` noise draws each) and, for the first two
    samples, the sample moved a share ``m`` of the way to the target inside the mask; and the collated batch."""
    import torch

    from refiner_rl.data import TripletDataset
    from refiner_rl.evaluation.loop import load_batch
    from refiner_rl.sampling import sample_images
    from tests.helpers import small_policy

    ds = TripletDataset(records, None, multiple=4)
    batch = load_batch(ds, range(len(ds)))
    per_record: list[list] = [[] for _ in records]
    for state in states:
        policy = small_policy(seed=seed)
        policy.transformer.load_state_dict(state)
        for d in range(draws):
            with torch.no_grad():
                out = sample_images(policy, batch, num_steps=4, seed=1000 * d + 37, start_sigma=0.3, paste=True)
            for i, x in enumerate(out):
                per_record[i].append(x)
    mask, target = batch["mask"].float(), batch["target"].float()
    for i, xs in enumerate(per_record):
        xs += [(x + m * mask[i] * (target[i] - x)).clamp(0, 1) for x in xs[:2] for m in moves]
    return per_record, batch


def write_pairs(folder: str, per_record, batch, records, per: int = 4, gap: float = 0.15, seed: int = 0) -> int:
    """Pairs of each record's candidates ranked by masked MSE to the target (``pairs.jsonl`` and PNGs); returns how
    many were written."""
    import numpy as np
    from PIL import Image

    def png(x, name):
        Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            os.path.join(folder, name)
        )

    os.makedirs(folder, exist_ok=True)
    rng, lines = random.Random(seed), []
    mask, target = batch["mask"].float(), batch["target"].float()
    for i, rec in enumerate(records):
        err = [float(((x - target[i]) ** 2 * mask[i]).sum() / (3 * mask[i].sum())) for x in per_record[i]]
        for key in ("reference", "draft", "mask"):
            rec[key].save(os.path.join(folder, f"r{i}_{key}.png"))
        made = 0
        for _ in range(200):
            if made == per:
                break
            j, k = rng.sample(range(len(err)), 2)
            if max(err[j], err[k]) < min(err[j], err[k]) * (1 + gap):
                continue
            better, worse = (j, k) if err[j] < err[k] else (k, j)
            a_wins = len(lines) % 2 == 0
            name = f"p{len(lines)}"
            png(per_record[i][better if a_wins else worse], f"{name}_a.png")
            png(per_record[i][worse if a_wins else better], f"{name}_b.png")
            row = {"id": name, "task": "refine", "dimension": "detail_fidelity", "prompt": rec["prompt"]}
            row |= {"preferred": "a" if a_wins else "b", "image_a": f"{name}_a.png", "image_b": f"{name}_b.png"}
            row |= {"reference": f"r{i}_reference.png", "source": f"r{i}_draft.png", "mask": f"r{i}_mask.png"}
            lines.append(json.dumps(row))
            made += 1
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def train_judge(out: str, data: str, eval_data: str, steps: int, seed: int) -> None:
    from refiner_rl.cli.main import main as cli

    argv = ["reward-model", "--config", "recipes/onereward/judge_reference_tiny.yaml", "--output_dir", out]
    argv += ["--dataset", data, "--eval_dataset", eval_data, "--max_steps", str(steps), "--seed", str(seed)]
    if cli([*argv, "--disable_tqdm", "true"]) != 0:
        raise SystemExit(f"training the judge on {data} failed")


def report(tag: str, judge: str, state, train, held, a) -> dict:
    out = {"judge": tag, "seed": a.seed, "lr": a.lr, "alignment": alignment(judge, state, held, a)}
    runs = {name: refl_run(judge, w, state, train, held, a) for name, w in (("preferred", 1.0), ("reversed", -1.0))}
    out |= {name: r[0] for name, r in runs.items()}
    print(json.dumps(out), flush=True)
    return runs["preferred"][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("editor", "adversarial"), required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40, help="ReFL steps")
    ap.add_argument("--lr", type=float, default=3e-4, help="ReFL learning rate")
    ap.add_argument("--start_sigma", type=float, default=0.3)
    a = ap.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # recipe paths are the repository's
    state, train, held = setup(a)
    from refiner_rl.data import synthetic_records
    from refiner_rl.onereward.synthetic import write_synthetic_pairs

    root = tempfile.mkdtemp()
    records = synthetic_records(128, seed=500 + a.seed, size=32)
    if a.mode == "editor":
        held_records = synthetic_records(32, seed=600 + a.seed, size=32)
        write_pairs(f"{root}/train", *candidates([state], records, a.seed), records, seed=a.seed)
        write_pairs(f"{root}/eval", *candidates([state], held_records, a.seed), held_records, seed=a.seed + 1)
        train_judge(f"{root}/judge", f"{root}/train", f"{root}/eval", 200, a.seed)
        report("editor samples", f"{root}/judge", state, train, held, a)
        return
    data = f"{root}/data"
    kind = "swap+shift+degrade+noise"
    write_synthetic_pairs(data, 512, seed=0, size=32, kind=kind, region=0.75, dimensions=("detail_fidelity",))
    with open(f"{data}/pairs.jsonl") as f:
        lines = f.read()
    fooled = None
    for r in range(a.rounds + 1):
        if fooled is not None:  # the fooled editor's samples against the SFT editor's and the target
            sub = f"round{r}"
            write_pairs(f"{data}/{sub}", *candidates([state, fooled], records, a.seed, moves=(1.0,), draws=2), records,
                        seed=r)  # fmt: skip
            with open(f"{data}/{sub}/pairs.jsonl") as f:
                for line in filter(str.strip, f):
                    row = json.loads(line)
                    row = {k: f"{sub}/{v}" if k.endswith(("_a", "_b")) or k in ("reference", "source", "mask") else v
                           for k, v in row.items()}  # fmt: skip
                    lines += json.dumps({**row, "id": f"{sub}-{row['id']}"}) + "\n"
            with open(f"{data}/pairs.jsonl", "w") as f:
                f.write(lines)
        train_judge(f"{root}/judge{r}", data, "synthetic", 300, a.seed)
        fooled = report(f"{kind}, adversarial round {r}", f"{root}/judge{r}", state, train, held, a)


if __name__ == "__main__":
    main()
