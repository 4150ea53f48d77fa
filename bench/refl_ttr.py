"""ReFL vs our GRPO on the tiny task, in one run: time to reward, and peak memory of the frozen vs EMA reference.

    nice -n 10 python bench/refl_ttr.py                 # both parts, a table
    nice -n 10 python bench/refl_ttr.py --json          # one JSON object on stdout
    nice -n 10 python bench/refl_ttr.py --skip memory   # time to reward only

1. ttr: the tiny learning task of tests/test_grpo_learning.py (random small policy trained fully, 16 px triplets, 4
   sampling steps from the draft noised to sigma 0.6, draft pasted back outside the mask, reward masked_pixel). From
   the same starting policy, training seconds (held-out evaluation excluded) until the held-out reward reaches
   ``start + gain * |start|``: GRPO with our settings (bench/grpo_ttr.py's, per-patch advantages, 2 x 8 samples per
   step) vs ReFL (masked_pixel back-propagated through the one-step prediction, the same 16 samples per step).
   The timing loop is bench/grpo_ttr.py's (``EvalUntil``), the GRPO trainer bench/grpo_step.py's.
2. memory: peak resident memory (CUDA: peak allocated) of a few ReFL steps with ``reference: frozen`` vs ``ema``,
   for full fine-tuning (frozen keeps a copy of the transformer; EMA keeps an fp32 shadow of it) and LoRA (frozen is
   the adapter switched off: no copy; EMA shadows the adapter only), each in a fresh process.

CPU timings on a shared machine are noisy: compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

os.environ["WANDB_MODE"] = "disabled"

import torch
from grpo_step import build_trainer as build_grpo_trainer  # bench/ is on sys.path when run as a script
from grpo_step import peak_memory, rope_axes
from grpo_ttr import TTR_BEST, EvalUntil, tiny_task, ttr_settings
from transformers.trainer_callback import PrinterCallback

from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.policies import KontextPolicy
from refiner_rl.trainers.refl_config import FlowReFLConfig
from refiner_rl.trainers.refl_trainer import FlowReFLTrainer

PARTS = ("ttr", "memory")


def build_refl_trainer(a, out_dir: str, shape: dict, lora_rank: int = 0, **overrides) -> FlowReFLTrainer:
    """A ReFL trainer over the GRPO bench's tiny policy (same seed: the same starting weights)."""
    torch.manual_seed(a.seed)
    policy = KontextPolicy.tiny(
        num_layers=shape["layers"],
        num_single_layers=shape["single_layers"],
        num_attention_heads=shape["heads"],
        attention_head_dim=shape["head_dim"],
        joint_attention_dim=32,
        axes_dims_rope=rope_axes(shape["head_dim"]),
        text_max_length=32,
    )
    if lora_rank:
        policy.add_lora(rank=lora_rank)
    policy.to(a.device)
    cfg = dict(
        output_dir=out_dir,
        per_device_train_batch_size=a.batch,
        num_inference_steps=a.ttr_sampling_steps,
        t1=1,
        t2=a.ttr_sampling_steps - 1,
        start_sigma=0.6,
        paste_back=True,
        rewards=[{"name": "masked_pixel"}],
        margin=None,
        learning_rate=a.refl_lr,
        lr_scheduler_type="constant",
        max_steps=a.ttr_max_steps,
        seed=a.seed,
        logging_steps=1,
        report_to="none",
        use_cpu=a.device == "cpu",
        disable_tqdm=True,
        save_strategy="no",
        log_samples=False,
        sample_steps=0,
    )
    cfg.update(overrides)
    train = TripletDataset(synthetic_records(64, seed=a.seed, size=shape["size"]), None, multiple=4)
    trainer = FlowReFLTrainer(policy, args=FlowReFLConfig(**cfg), train_dataset=train)
    trainer.remove_callback(PrinterCallback)
    return trainer


TINY = dict(layers=1, single_layers=1, heads=2, head_dim=16, size=16)


def time_to_reward(a) -> dict:
    held_out = TripletDataset(synthetic_records(16, seed=a.seed + 1, size=16), None, multiple=4)
    g = tiny_task(  # grpo_step's arguments at the task's shapes: 2 groups of 8 per step, full fine-tuning
        argparse.Namespace(
            sampling_steps=a.ttr_sampling_steps, lr=a.ttr_lr, max_steps=a.ttr_max_steps, device=a.device, seed=a.seed
        )
    )
    builders = {
        "grpo": lambda out: build_grpo_trainer(g, out, **{**ttr_settings(g), **TTR_BEST}),
        "refl": lambda out: build_refl_trainer(a, out, TINY),
    }
    runs, start = {}, None
    for name, build in builders.items():
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build(tmp)
            r0 = trainer.evaluate(held_out)["eval_reward"]
            start = r0 if start is None else start
            assert abs(r0 - start) < 1e-6, f"{name} starts from another policy ({r0} vs {start})"
            level = start + a.ttr_gain * abs(start)
            cb = EvalUntil(trainer, held_out, a.ttr_eval_every, level, a.ttr_budget)
            trainer.add_callback(cb)
            t0 = time.perf_counter()
            trainer.train()
            steps = trainer.state.global_step
            runs[name] = {
                "seconds_to_level": None if cb.reached is None else round(cb.reached, 1),
                "train_s": round(cb.train_s, 1),
                "steps": steps,
                "step_s": round(cb.train_s / max(steps, 1), 3),
                "wall_s": round(time.perf_counter() - t0, 1),
                "curve": cb.curve,
            }
    g_s, r_s = runs["grpo"]["seconds_to_level"], runs["refl"]["seconds_to_level"]
    ratio = round(g_s / r_s, 2) if g_s and r_s else None
    return {"start_reward": start, "level": start + a.ttr_gain * abs(start), "runs": runs, "grpo_over_refl": ratio}


# ---------------------------------------------------------------------------------------------------- memory
MEMORY_SETTINGS = {
    "full/frozen": dict(lora_rank=0, reference="frozen"),
    "full/ema": dict(lora_rank=0, reference="ema"),
    "lora/frozen": dict(lora_rank=16, reference="frozen"),
    "lora/ema": dict(lora_rank=16, reference="ema"),
}
MEMORY_SHAPE = dict(layers=4, single_layers=8, heads=4, head_dim=64, size=32)  # ~25 M parameters: the copy shows


def memory_probe(a) -> dict:
    """The ``--probe`` child: a few ReFL steps of one setting, then this process's peak memory."""
    s = dict(MEMORY_SETTINGS[a.probe])
    lora = s.pop("lora_rank")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_refl_trainer(
            a,
            tmp,
            MEMORY_SHAPE,
            lora_rank=lora,
            max_steps=a.probe_steps,
            per_device_train_batch_size=a.probe_batch,
            **s,
        )
        params = sum(p.numel() for p in trainer.model.parameters())
        trainer.train()
    return {**peak_memory(a.device), "transformer_params_m": round(params / 1e6, 1)}


def memory_compare(a, argv: list[str]) -> dict:
    out = {}
    for name in MEMORY_SETTINGS:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--probe", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if res.returncode != 0:
            raise RuntimeError(f"memory probe {name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def _table(res: dict) -> str:
    lines = []
    if "ttr" in res:
        t = res["ttr"]
        lines.append(f"time to reward: start {t['start_reward']:.5f}, level {t['level']:.5f}")
        for name, r in t["runs"].items():
            lines.append(
                f"  {name:5s} reached in {r['seconds_to_level']} s ({r['steps']} steps, {r['step_s']} s/step, "
                f"trained {r['train_s']} s); curve (step, s, reward): {r['curve']}"
            )
        lines.append(f"  GRPO time / ReFL time: {t['grpo_over_refl']}")
    if "memory" in res:
        lines.append("peak memory of a few ReFL steps (fresh process each):")
        for name, m in res["memory"].items():
            lines.append(f"  {name:12s} " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="ReFL samples per step (GRPO: 2 groups of 8)")
    p.add_argument("--refl_lr", type=float, default=3e-3)
    p.add_argument("--ttr_sampling_steps", type=int, default=4)
    p.add_argument("--ttr_lr", type=float, default=3e-3, help="GRPO's learning rate")
    p.add_argument("--ttr_gain", type=float, default=0.05, help="level = start + gain * |start|")
    p.add_argument("--ttr_eval_every", type=int, default=5)
    p.add_argument("--ttr_budget", type=float, default=120.0, help="training seconds per trainer")
    p.add_argument("--ttr_max_steps", type=int, default=1000)
    p.add_argument("--probe_steps", type=int, default=2, help="ReFL steps of each memory probe")
    p.add_argument("--probe_batch", type=int, default=2, help="samples per step of each memory probe")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.disable(logging.WARNING)
    if a.probe is not None:
        print(json.dumps(memory_probe(a)))
        return 0
    res: dict = {"device": a.device}
    if "ttr" not in a.skip:
        res["ttr"] = time_to_reward(a)
    if "memory" not in a.skip:
        res["memory"] = memory_compare(a, argv)
    print(json.dumps(res) if a.json else _table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
