"""Time to reward on the tiny learning task: training wall time (held-out evaluation excluded) until the held-out
reward reaches a level above the starting policy's.

Two uses:

- the objectives (this file's own run): grpo, grpo + GRPO-Guard (``ratio_normalization``), DiffusionNFT and
  Advantage Weighted Matching on the same task, seed, rewards and starting policy; time to +5% and +20% over the
  start, per-step time and peak memory (each objective in a fresh process: its VmHWM, and CUDA's peak on a GPU)::

      nice -n 10 python bench/grpo_ttr.py                 # all four, table
      nice -n 10 python bench/grpo_ttr.py --json --budget 60 --objectives grpo nft

- the fourth part of ``bench/grpo_step.py`` (which imports :func:`time_to_reward`): our GRPO settings vs peer-like
  ones (every step stochastic, all but the last trained, one advantage per image, independent noise), run through
  ``python bench/grpo_step.py --skip breakdown overhead window memory``.

The starting policy is the bench's tiny random editor (the task's stand-in for an SFT start). CPU timings on a
shared machine are noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from transformers import TrainerCallback

from refiner_rl.data import TripletDataset, synthetic_records

TTR_BEST = dict(sde_window_size=2, sde_window_start=0, spatial_advantage_mix=1.0, shared_initial_noise=True)
TTR_PEER = dict(spatial_advantage_mix=0.0, shared_initial_noise=False)  # window: every step but the last (set below)


def ttr_settings(a) -> dict:
    """The tiny learning task of tests/test_grpo_learning.py (the settings documented there)."""
    return dict(
        num_inference_steps=a.ttr_sampling_steps,
        learning_rate=a.ttr_lr,
        beta=0.0,
        start_sigma=0.6,
        paste_back=True,
        rewards=[{"name": "masked_pixel", "patch_size": 4}],
        lr_scheduler_type="constant",
        max_steps=a.ttr_max_steps,
    )


class EvalUntil(TrainerCallback):
    """Held-out reward every ``every`` steps; stops once every level of ``level`` (one value or a list) is reached,
    or after ``budget_s`` training seconds. ``reached``: the seconds to the first level; ``reached_at`` and
    ``reached_step``: the seconds and the step per level. Evaluation time is not counted."""

    def __init__(self, trainer, dataset, every: int, level, budget_s: float):
        self.trainer, self.dataset, self.every, self.budget = trainer, dataset, every, budget_s
        self.levels = [float(x) for x in (level if isinstance(level, (list, tuple)) else [level])]
        self.train_s, self.curve, self.reached_at, self.reached_step, self.steps = 0.0, [], {}, {}, 0
        self._t = None

    @property
    def reached(self) -> float | None:
        return self.reached_at.get(self.levels[0])

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t is None:
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_s += time.perf_counter() - self._t
        self.steps = state.global_step
        if state.global_step % self.every == 0:
            r = self.trainer.evaluate(self.dataset)["eval_reward"]
            self.curve.append((state.global_step, round(self.train_s, 2), r))
            for lv in self.levels:
                if r >= lv and lv not in self.reached_at:
                    self.reached_at[lv] = self.train_s
                    self.reached_step[lv] = state.global_step
            if len(self.reached_at) == len(self.levels):
                control.should_training_stop = True
        if self.train_s > self.budget:
            control.should_training_stop = True
        self._t = time.perf_counter()


def time_to_reward(a, build_trainer) -> dict:
    """Training seconds (held-out evaluation excluded) until the held-out reward reaches ``start + ttr_gain *
    |start|``, for our settings vs peer-like ones; ``build_trainer(args, out_dir, **config)`` builds each trainer."""
    logging.getLogger("refiner_rl").setLevel(logging.ERROR)
    held_out = TripletDataset(synthetic_records(16, seed=a.seed + 1, size=16), None, multiple=4)
    runs = {}
    start = None
    tiny = argparse.Namespace(
        **{
            **vars(a),
            "layers": 1,
            "single_layers": 1,
            "heads": 2,
            "head_dim": 16,
            "joint_dim": 32,
            "size": 16,
            "group": 8,
            "prompts": 2,
            "lora_rank": 0,
            "seed": a.seed,
        }
    )
    peer = dict(TTR_PEER, sde_window_size=a.ttr_sampling_steps - 1, sde_window_start=0)
    settings = [("ours", TTR_BEST), ("peer_like", peer)]
    if a.ttr_ablations:  # one of our changes at a time, on top of the peer-like settings
        settings += [
            ("peer+spatial", dict(peer, spatial_advantage_mix=1.0)),
            ("peer+shared_noise", dict(peer, shared_initial_noise=True)),
            ("peer+window_2", dict(peer, sde_window_size=2)),
        ]
    for name, extra in settings:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(tiny, tmp, **{**ttr_settings(a), **extra})
            if start is None:
                start = trainer.evaluate(held_out)["eval_reward"]
            level = start + a.ttr_gain * abs(start)
            cb = EvalUntil(trainer, held_out, a.ttr_eval_every, level, a.ttr_budget)
            trainer.add_callback(cb)
            trainer.train()
            runs[name] = {
                "seconds_to_level": cb.reached,
                "train_s": round(cb.train_s, 1),
                "curve": cb.curve,
                "settings": extra,
            }
    o, p = runs["ours"]["seconds_to_level"], runs["peer_like"]["seconds_to_level"]
    speedup = None
    if o is not None:
        speedup = (p / o) if p is not None else f">{runs['peer_like']['train_s'] / o:.1f} (peer-like never reached it)"
    return {"start_reward": start, "level": start + a.ttr_gain * abs(start), "runs": runs, "speedup": speedup}


# ------------------------------------------------------------------------------------------------ objectives
# The task, rewards, seed, start, learning rate (constant, --lr) and per-token advantages are shared; grpo keeps
# our SDE-window settings, nft/awm their ODE rollouts with 2 re-noised times per sample. (At a constant 1e-2, the
# rate tests/test_objectives_learning.py decays linearly, nft and awm oscillate and awm falls below its start.)
OBJECTIVES = {
    "grpo": dict(TTR_BEST, objective="grpo"),
    "grpo_guard": dict(TTR_BEST, objective="grpo", ratio_normalization=True),
    "nft": dict(objective="nft", spatial_advantage_mix=1.0, shared_initial_noise=False, train_timesteps=2),
    "awm": dict(objective="awm", spatial_advantage_mix=1.0, shared_initial_noise=False, train_timesteps=2),
}


def tiny_task(a) -> argparse.Namespace:
    """``bench/grpo_step.py``'s command-line defaults at the tiny task's shapes (full fine-tuning, groups of 8)."""
    shapes = dict(layers=1, single_layers=1, heads=2, head_dim=16, joint_dim=32, text_len=32, codec_factor=2)
    step = dict(size=16, group=8, prompts=2, sampling_steps=4, trained_steps=2, sde_type="flow_sde", records=64)
    ttr = dict(ttr_sampling_steps=a.sampling_steps, ttr_lr=a.lr, ttr_max_steps=a.max_steps)
    return argparse.Namespace(
        **shapes,
        **step,
        **ttr,
        guidance_embeds=False,
        lora_rank=0,
        lora_targets="",
        beta=0.0,
        start_sigma=0.6,
        warmup=0,
        iters=0,
        device=a.device,
        seed=a.seed,
    )


def run_objective(a, name: str) -> dict:
    """One objective's run in this process: held-out reward every ``a.eval_every`` steps until every gain level is
    reached or ``a.budget`` training seconds are spent."""
    import resource

    import torch
    from grpo_step import build_trainer

    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    settings = OBJECTIVES[name]
    task = tiny_task(a)
    held_out = TripletDataset(synthetic_records(16, seed=a.seed + 1, size=16), None, multiple=4)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(task, tmp, **{**ttr_settings(task), **settings})
        start = trainer.evaluate(held_out)["eval_reward"]
        levels = [start + g * abs(start) for g in a.gains]
        cb = EvalUntil(trainer, held_out, a.eval_every, levels, a.budget)
        trainer.add_callback(cb)
        if torch.cuda.is_available() and a.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    out = {
        "start_reward": start,
        "lr": a.lr,
        "seconds_to": {f"+{g:.0%}": cb.reached_at.get(lv) for g, lv in zip(a.gains, levels)},
        "steps_to": {f"+{g:.0%}": cb.reached_step.get(lv) for g, lv in zip(a.gains, levels)},
        "steps": cb.steps,
        "train_s": round(cb.train_s, 1),
        "step_s": cb.train_s / max(cb.steps, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": cb.curve,
        "settings": settings,
    }
    if torch.cuda.is_available() and a.device != "cpu":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def compare_objectives(a) -> dict:
    """Every objective of ``a.objectives``, each in a fresh process (so its peak memory is its own)."""
    import json
    import os
    import subprocess
    import sys

    runs = {}
    for name in a.objectives:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, *a.argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    key = f"+{a.gains[0]:.0%}"
    base = runs.get("grpo", {}).get("seconds_to", {}).get(key)
    for r in runs.values():
        s = r["seconds_to"][key]
        r["speedup_vs_grpo"] = (base / s) if (base and s) else None
    return {"gains": a.gains, "budget_s": a.budget, "seed": a.seed, "device": a.device, "runs": runs}


def _table(res: dict) -> str:
    keys = [f"+{g:.0%}" for g in res["gains"]]
    head = f"{'objective':<11} {'start':>9} " + " ".join(f"{'s (steps) to ' + k:>18}" for k in keys)
    lines = [
        f"time to reward on the tiny task (seed {res['seed']}, {res['device']}, budget {res['budget_s']} s each)",
        head + f" {'x grpo':>7} {'s/step':>7} {'steps':>6} {'peak RSS':>9}",
    ]
    for name, r in res["runs"].items():
        to = " ".join(
            f"{r['seconds_to'][k]:>11.1f} ({r['steps_to'][k]:>4})" if r["seconds_to"][k] is not None else f"{'-':>18}"
            for k in keys
        )
        sp = f"{r['speedup_vs_grpo']:.2f}x" if r["speedup_vs_grpo"] else "-"
        cuda = f" (CUDA {r['cuda_peak_allocated_mb']:.0f} MB)" if "cuda_peak_allocated_mb" in r else ""
        lines.append(
            f"{name:<11} {r['start_reward']:>9.5f} {to} {sp:>7} {r['step_s']:>7.3f} {r['steps']:>6} "
            f"{r['peak_rss_mb']:>6.0f} MB{cuda}"
        )
    lines.append("-: not reached within the budget; x grpo: grpo's seconds to the first level / this one's")
    lines.append("steps are evaluated every --eval_every steps; on a shared CPU compare steps as well as seconds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    import torch

    p = argparse.ArgumentParser(description="Time to reward of grpo, grpo+guard, nft and awm on the tiny task.")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--gains", nargs="+", type=float, default=[0.05, 0.20], help="levels: start + gain * |start|")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per objective")
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--sampling_steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of objectives without their own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one objective, JSON on stdout
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(run_objective(a, a.one), default=str))
        return 0
    a.argv = [x for x in argv if x != "--json"]
    res = compare_objectives(a)
    print(json.dumps(res, indent=2, default=str) if a.json else _table(res))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
