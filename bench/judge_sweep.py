"""Sweep the tiny OneReward judge's settings: held-out pairwise accuracy before/after training, per setting.

Each setting builds the tiny random Qwen2.5-VL judge (:func:`refiner_rl.vlm.tiny.build_tiny_judge`), a synthetic
preference set of a given ``kind`` (:func:`refiner_rl.onereward.synthetic.synthetic_pairs`; several joined with ``+``,
then held-out accuracy is also given per kind, ``acc/<kind>``), shows images A and B as they are (``view:
separate``, with the ``context`` images before them) or each with the reference in one image (``beside``,
``interleave``: :func:`refiner_rl.onereward.collator.with_reference`), encodes every pair in both orders once,
then trains all weights with AdamW on OneReward's two-order loss (:func:`refiner_rl.onereward.loss.pairwise_judge_loss`). Held-out accuracy is the order-averaged score's
(``s > 1/2``); ``acc1`` is the single-order accuracy (``P(Yes | winner, loser) > 1/2`` and
``P(Yes | loser, winner) < 1/2`` counted separately), which a judge that only reads image order cannot lift.

    python bench/judge_sweep.py --device cuda --out /tmp/judge_sweep.json --grid full
    python bench/judge_sweep.py --grid smoke --steps 3          # CPU check
    OMP_NUM_THREADS=1 python bench/judge_sweep.py --grid reference --seed 0 --train_pairs 512 --eval_pairs 96
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

BASE = {"kind": "noise", "context": "none", "lr": 1e-2, "patch": 4, "pixels": 32 * 32, "width": 32, "init_std": 0.3}
BASE.update(size=32, batch=16, region=0.75, vision_std=0.03, seed_offset=0)  # vision_std < 0: half of init_std
BASE.update(view="separate")  # separate images, or each candidate with the reference in one image (`beside`, ...)
REFERENCE = {"kind": "swap+shift+degrade", "lr": 3e-3, "vision_std": 0.15}  # the reference judge's recipe
GRIDS = {  # each entry: the changes from BASE, in the order they run (the most telling first)
    "one": [{}],  # BASE with the --set overrides
    # the reference judge (recipes/onereward/judge_reference_tiny.yaml) and its controls, on the recipe's mix:
    # each candidate with the reference interleaved row by row, side by side, as a separate image, and no reference
    "reference": [
        {**REFERENCE, "view": "interleave", "pixels": 2048},
        {**REFERENCE, "view": "beside", "pixels": 2048},
        {**REFERENCE, "context": "reference"},
        {**REFERENCE, "context": "source"},
    ],
    "smoke": [{"kind": "detail", "pixels": 56 * 56, "patch": 14}],
    "full": [
        {},
        {"kind": "detail"},
        {"kind": "shift", "context": "reference"},
        {"kind": "swap", "context": "reference"},
        {"kind": "detail", "context": "reference"},
        {"lr": 3e-3},
        {"lr": 2e-2},
        {"batch": 8},
        {"region": 0.5},
        {"vision_std": 0.01},
        {"kind": "shift", "context": "reference", "lr": 3e-3},
        {"kind": "shift", "context": "reference", "batch": 32},
        {"kind": "swap", "context": "none"},
        {"seed_offset": 1},
        {"width": 64},
        {"patch": 14, "pixels": 112 * 112},
    ],
}


def encode(processor, templates, records, device):
    """All pairs of ``records`` in both orders, collated once (every chat has the same length)."""
    from refiner_rl.onereward.collator import PairCollator

    batch = PairCollator(processor, templates)(records)
    n = len(records)
    per_chat = batch["pixel_values"].shape[0] // (2 * n)
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["pixel_values"] = out["pixel_values"].view(2 * n, per_chat, -1)
    out["image_grid_thw"] = out["image_grid_thw"].view(2 * n, -1, 3)
    return out, n


def take(enc, n, idx):
    """Rows ``idx`` (pairs) of an encoded set: their forward then their reversed chats."""
    rows = torch.cat([idx, idx + n]).to(enc["input_ids"].device)
    out = {}
    for k, v in enc.items():
        if k == "groups":
            continue
        v = v[rows]
        if k == "pixel_values":
            v = v.reshape(-1, v.shape[-1])
        elif k == "image_grid_thw":
            v = v.reshape(-1, 3)
        out[k] = v
    return out


def outputs(model, enc, n, idx, yes_ids, no_ids):
    from refiner_rl.onereward.loss import pairwise_judge_loss

    logits = model(**take(enc, n, idx), logits_to_keep=1).logits[:, -1]
    k = idx.shape[0]
    return pairwise_judge_loss(logits[:k], logits[k:], yes_ids, no_ids)


@torch.no_grad()
def accuracy(model, enc, n, yes_ids, no_ids, batch=32, kinds=None):
    """Held-out figures of the first 256 pairs; ``kinds`` (one name per pair) adds ``acc/<kind>``."""
    m = min(n, 256)
    model.eval()
    parts = [outputs(model, enc, n, torch.arange(i, min(i + batch, m)), yes_ids, no_ids) for i in range(0, m, batch)]
    model.train()
    score = torch.cat([p.score for p in parts])
    fwd, rev = torch.cat([p.p_yes_forward for p in parts]), torch.cat([p.p_yes_reversed for p in parts])
    loss = torch.cat([p.loss for p in parts]).mean().item()
    acc1 = 0.5 * ((fwd > 0.5).float().mean() + (rev < 0.5).float().mean()).item()
    out = {"acc": (score > 0.5).float().mean().item(), "acc1": acc1, "loss": loss}
    for kind in sorted(set(kinds[:m])) if kinds and len(set(kinds)) > 1 else ():
        hit = [bool(s > 0.5) for s, k in zip(score.tolist(), kinds[:m]) if k == kind]
        out[f"acc/{kind}"] = sum(hit) / len(hit)
    return out


def viewed(records, view: str):
    """The records as the judge sees them: ``separate`` as they are, otherwise each candidate with the reference
    in one image (:func:`refiner_rl.onereward.collator.with_reference`)."""
    from refiner_rl.onereward.collator import with_reference

    if view == "separate":
        return records
    return [{**r, **{k: with_reference(r[k], r["reference"], view) for k in ("image_a", "image_b")}} for r in records]


_ENCODED: dict = {}


def run(setting: dict, args, device) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from refiner_rl.onereward.synthetic import synthetic_pairs
    from refiner_rl.onereward.templates import load_templates
    from refiner_rl.vlm.questions import answer_token_ids
    from refiner_rl.vlm.tiny import build_tiny_judge

    seed = args.seed + setting["seed_offset"]  # the model's draw and the batch order
    torch.manual_seed(seed)
    templates = load_templates(
        {
            "template": "{task} {dimension}: is Image A better than Image B?",
            "tasks": {
                "refine": {
                    "dimensions": ["detail_fidelity"],
                    "context": [c for c in setting["context"].split("+") if c != "none"],
                }
            },
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_judge(
            tmp,
            seed=seed,
            init_std=setting["init_std"],
            vision_init_std=None if setting["vision_std"] < 0 else setting["vision_std"],
            patch_size=setting["patch"],
            pixels=setting["pixels"],
            hidden_size=setting["width"],
        )
        processor = AutoProcessor.from_pretrained(tmp)
        model = AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).to(device)
    yes_ids, no_ids = answer_token_ids(processor.tokenizer, ["Yes", " Yes"], ["No", " No"], "tiny judge")
    kw = {"size": setting["size"], "kind": setting["kind"], "dimensions": ("detail_fidelity",)}
    kw["region"] = setting["region"]
    key = tuple(setting[k] for k in ("kind", "size", "context", "patch", "pixels", "region", "view"))
    if key not in _ENCODED:  # the same images and chats for every model and optimiser setting
        train_recs = viewed(synthetic_pairs(args.train_pairs, seed=0, **kw), setting["view"])
        held_recs = viewed(synthetic_pairs(args.eval_pairs, seed=1, **kw), setting["view"])
        _ENCODED[key] = (
            encode(processor, templates, train_recs, device),
            encode(processor, templates, held_recs, device),
            [r["kind"] for r in held_recs],
        )
    (train, n_train), (held, n_held), kinds = _ENCODED[key]
    opt = torch.optim.AdamW(model.parameters(), lr=setting["lr"], weight_decay=0.0)
    before = accuracy(model, held, n_held, yes_ids, no_ids, kinds=kinds)
    curve, start = [], time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for step in range(1, args.steps + 1):
        idx = torch.randperm(n_train, generator=g)[: setting["batch"]]
        loss = outputs(model, train, n_train, idx, yes_ids, no_ids).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            fig = accuracy(model, held, n_held, yes_ids, no_ids, kinds=kinds)
            curve.append({"step": step, "train_loss": loss.item(), **fig})
            if args.verbose:
                print(f"  step {step} " + " ".join(f"{k} {v:.3f}" for k, v in curve[-1].items() if k != "step"))
    seconds = time.perf_counter() - start  # training and held-out evaluations, not the encoding
    train_acc = accuracy(model, train, n_train, yes_ids, no_ids)
    return {
        **setting,
        "before": before,
        "after": curve[-1],
        "best_acc": max(c["acc"] for c in curve),
        "train_acc": train_acc["acc"],
        "curve": curve,
        "seconds": seconds,
        "vision_tokens": int(train["image_grid_thw"][0, 0].prod().item() // 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file of the results")
    p.add_argument("--grid", default="smoke", choices=sorted(GRIDS))
    p.add_argument("--set", action="append", default=[], help="override a setting everywhere: key=value")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--train_pairs", type=int, default=1024)
    p.add_argument("--eval_pairs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every held-out evaluation")
    p.add_argument("--budget_s", type=float, default=float("inf"), help="start no setting after this many seconds")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(BASE[key])(float(value) if isinstance(BASE[key], (int, float)) else value)
    keys = list(BASE)
    device = torch.device(args.device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    results, began = [], time.perf_counter()
    for change in GRIDS[args.grid]:
        setting = {**BASE, **change, **overrides}
        if time.perf_counter() - began > args.budget_s:
            print(f"budget of {args.budget_s:.0f}s spent: skipped {setting}", flush=True)
            continue
        try:
            r = run(setting, args, device)
        except Exception as err:  # noqa: BLE001 - one bad setting must not stop the sweep
            r = {**setting, "error": f"{type(err).__name__}: {err}"}
        results.append(r)
        label = " ".join(f"{k}={setting[k]}" for k in keys if k in change or k in overrides or k == "kind")
        if "error" in r:
            print(f"{label} ERROR {r['error']}", flush=True)
        else:
            b, a = r["before"], r["after"]
            print(
                f"{label} tok={r['vision_tokens']} acc {b['acc']:.3f}->{a['acc']:.3f} (best {r['best_acc']:.3f}) "
                f"acc1 {b['acc1']:.3f}->{a['acc1']:.3f} loss {b['loss']:.3f}->{a['loss']:.3f} "
                f"train_acc {r['train_acc']:.3f} {r['seconds']:.0f}s "
                + " ".join(f"{k} {b[k]:.3f}->{a[k]:.3f}" for k in a if k.startswith("acc/")),
                flush=True,
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"sweep done in {time.perf_counter() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
