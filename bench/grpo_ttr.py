"""Time to reward on the tiny learning task: training wall time (held-out evaluation excluded) until the held-out
reward reaches a level above the starting policy's.

Two uses:

- the objectives (this file's own run): grpo, grpo + GRPO-Guard (``ratio_normalization``), DiffusionNFT and
  Advantage Weighted Matching on the same task, seed, rewards and starting policy, over a grid of learning rates,
  updates per rollout (``num_iterations``) and the objectives' own settings; steps, rollouts and training seconds to
  +5% and +20% over the start, per-step time and peak memory. Every run is a fresh process (its VmHWM, and CUDA's
  peak on a GPU); with ``--workers`` > 1 the grid runs concurrently and each objective's best setting is then rerun
  alone, so the final seconds compare::

      nice -n 10 python bench/grpo_ttr.py                 # all four at lr 3e-3, one update per rollout
      # the figures of docs/algorithms.md: each objective at its best learning rate and updates per rollout
      nice -n 10 python bench/grpo_ttr.py --set grpo.learning_rate=3e-3,1e-2 grpo_guard.learning_rate=3e-3,1e-2 \
          nft.num_iterations=2 --max_steps 150 --budget 60
      python bench/grpo_ttr.py --device cuda --lr 3e-3 1e-2 --num_iterations 1 4 --workers 10 --out results.json

- the fourth part of ``bench/grpo_step.py`` (which imports :func:`time_to_reward`): our GRPO settings vs peer-like
  ones (every step stochastic, all but the last trained, one advantage per image, independent noise), run through
  ``python bench/grpo_step.py --skip breakdown overhead window memory``.

The starting policy is the bench's tiny random editor (the task's stand-in for an SFT start). CPU timings on a
shared machine are noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import logging
import os
import subprocess
import sys
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

    def __init__(self, trainer, dataset, every: int, level, budget_s: float, sync=None):
        self.trainer, self.dataset, self.every, self.budget, self.sync = trainer, dataset, every, budget_s, sync
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
        if self.sync is not None:  # CUDA: the step's kernels are done before the clock is read
            self.sync()
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
# The task, rewards, seed, start and per-token advantages are shared; grpo keeps our SDE-window settings, nft/awm
# their ODE rollouts with re-noised times per sample. The grid's axes (AXES) vary the rest per objective.
OBJECTIVES = {
    "grpo": dict(TTR_BEST, objective="grpo"),
    "grpo_guard": dict(TTR_BEST, objective="grpo", ratio_normalization=True),
    "nft": dict(objective="nft", spatial_advantage_mix=1.0, shared_initial_noise=False, train_timesteps=2),
    "awm": dict(objective="awm", spatial_advantage_mix=1.0, shared_initial_noise=False, train_timesteps=2),
}
# Grid axes: config field -> (its short name in the table, the objectives it changes: expanded only there).
# num_iterations: optimizer steps per rollout (the rollout's old log-probs / old velocities are kept across them).
ALL = ("grpo", "grpo_guard", "nft", "awm")
AXES = {
    "learning_rate": ("lr", ALL),
    "num_iterations": ("mu", ALL),
    "train_timesteps": ("K", ("nft", "awm")),
    "nft_beta": ("beta", ("nft",)),
    "adv_clip_max": ("Amax", ("nft",)),
    "nft_adaptive_weight": ("adapt", ("nft",)),
}


def grid(a) -> list[tuple[str, dict]]:
    """(objective, settings) for every objective of ``a.objectives`` and every combination of its axes' values;
    ``a.set`` entries ``objective.field=v1,v2`` replace an axis (or add a config field) for one objective."""
    runs = []
    for name in a.objectives:
        axes = {k: getattr(a, k) for k, (_, names) in AXES.items() if name in names}
        for entry in a.set or []:
            key, _, values = entry.partition("=")
            obj, _, field = key.partition(".")
            if obj == name:
                axes[field] = [_value(v) for v in values.split(",")]
        runs += [(name, dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    return runs


def _value(text: str):
    """A ``--set`` value: JSON (numbers, true/false) or else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def tiny_task(a) -> argparse.Namespace:
    """``bench/grpo_step.py``'s command-line defaults at the tiny task's shapes (full fine-tuning, groups of 8)."""
    shapes = dict(layers=1, single_layers=1, heads=2, head_dim=16, joint_dim=32, text_len=32, codec_factor=2)
    step = dict(size=16, group=8, prompts=2, sampling_steps=4, trained_steps=2, sde_type="flow_sde", records=64)
    ttr = dict(ttr_sampling_steps=a.sampling_steps, ttr_lr=a.learning_rate[0], ttr_max_steps=a.max_steps)
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


def run_objective(a, name: str, params: dict) -> dict:
    """One run in this process: held-out reward every ``a.eval_every`` steps until every gain level is reached, or
    ``a.max_steps`` steps, or ``a.budget`` training seconds. On CUDA, ``a.warmup_steps`` throwaway steps of the same
    settings first (kernel and allocator warm-up, not timed); fp32 unless ``a.bf16``."""
    import resource

    import torch
    from grpo_step import build_trainer

    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    settings = {**ttr_settings(tiny_task(a)), **OBJECTIVES[name], **params, "bf16": a.bf16, "sample_steps": 0}
    held_out = TripletDataset(synthetic_records(16, seed=a.seed + 1, size=16), None, multiple=4)
    if cuda and a.warmup_steps:
        with tempfile.TemporaryDirectory() as tmp:
            build_trainer(tiny_task(a), tmp, **{**settings, "max_steps": a.warmup_steps}).train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tiny_task(a), tmp, **settings)
        start = trainer.evaluate(held_out)["eval_reward"]
        levels = [start + g * abs(start) for g in a.gains]
        cb = EvalUntil(trainer, held_out, a.eval_every, levels, a.budget, sync=torch.cuda.synchronize if cuda else None)
        trainer.add_callback(cb)
        trainer.train()
        per_rollout = trainer.args.generate_every // trainer.args.gradient_accumulation_steps
    keys = [f"+{g:.0%}" for g in a.gains]
    steps_to = {k: cb.reached_step.get(lv) for k, lv in zip(keys, levels)}
    out = {
        "objective": name,
        "params": params,
        "start_reward": start,
        "final_gain": (cb.curve[-1][2] - start) / abs(start) if cb.curve else None,
        "max_gain": (max(c[2] for c in cb.curve) - start) / abs(start) if cb.curve else None,
        "seconds_to": {k: cb.reached_at.get(lv) for k, lv in zip(keys, levels)},
        "steps_to": steps_to,
        "rollouts_to": {k: (-(-s // per_rollout) if s else None) for k, s in steps_to.items()},
        "steps": cb.steps,
        "train_s": round(cb.train_s, 2),
        "step_s": cb.train_s / max(cb.steps, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": cb.curve,
        "settings": {k: v for k, v in settings.items() if k not in ("rewards",)},
    }
    if cuda:
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _spawn(a, name: str, params: dict) -> dict:
    """:func:`run_objective` in a fresh process (its peak memory is its own); its JSON result. Not started once
    ``a.deadline`` wall seconds have passed since ``a.t0``."""
    if a.deadline and time.time() - a.t0 > a.deadline:
        return {"objective": name, "params": params, "error": "not run: --deadline passed"}
    job = json.dumps({"name": name, "params": params, "a": {k: v for k, v in vars(a).items() if k != "t0"}})
    cmd = [sys.executable, os.path.abspath(__file__), "--one", job]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        return {"objective": name, "params": params, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rank(r: dict, key: str) -> tuple:
    """Sort key of a run: reached the first level sooner (seconds), then the higher final gain."""
    s = r.get("seconds_to", {}).get(key)
    return (s is None, s if s is not None else 0.0, -(r.get("final_gain") or -1e9))


def compare_objectives(a) -> dict:
    """The grid (``a.workers`` fresh processes at a time), then, if it ran concurrently, each objective's best
    setting (fewest seconds to the first level, then the highest final gain) again alone, one process after
    another: the seconds and memory of the final table. With one worker the grid's runs were already alone."""
    key = f"+{a.gains[0]:.0%}"
    with concurrent.futures.ThreadPoolExecutor(max(1, a.workers)) as pool:
        runs = list(pool.map(lambda x: _spawn(a, *x), grid(a)))
    best = {}
    for r in runs:
        if "error" not in r and (r["objective"] not in best or _rank(r, key) < _rank(best[r["objective"]], key)):
            best[r["objective"]] = r
    if a.workers > 1:
        if not a.json:  # the grid's table first, in case the reruns are cut short
            print(_table({**_summary(a, runs), "best": {}}), flush=True)
        best = {name: _spawn(a, name, r["params"]) for name, r in best.items()}
    base = best.get("grpo", {})
    for r in best.values():
        for unit in ("seconds_to", "steps_to", "rollouts_to"):
            b, s = base.get(unit, {}).get(key), r.get(unit, {}).get(key)
            r[f"x_grpo_{unit[:-3]}"] = (b / s) if (b and s) else None
    return {**_summary(a, runs), "best": best}


def _summary(a, runs: list[dict]) -> dict:
    keys = ("gains", "budget", "max_steps", "eval_every", "seed", "device", "workers", "bf16", "threads")
    return {**{k: getattr(a, k) for k in keys}, "grid": runs}


def _row(r: dict, keys: list[str], speed: bool) -> str:
    if "error" in r:
        return f"{r['objective']:<11} {_params(r['params']):<42} failed: {r['error'].strip().splitlines()[-1][:80]}"
    to = " ".join(
        f"{r['seconds_to'][k]:>7.1f}s {r['steps_to'][k]:>4}/{r['rollouts_to'][k]:<4}"
        if r["seconds_to"][k] is not None
        else f"{'-':>18}"
        for k in keys
    )
    sp = ""
    if speed:
        sp = " ".join(
            f"{r[c]:>5.2f}x" if r.get(c) else f"{'-':>6}" for c in ("x_grpo_seconds", "x_grpo_steps", "x_grpo_rollouts")
        )
    cuda = f" {r['cuda_peak_allocated_mb']:>6.0f}" if "cuda_peak_allocated_mb" in r else ""
    gain = f"{r['final_gain']:+.1%}/{r['max_gain']:+.1%}" if r["final_gain"] is not None else "-"
    return (
        f"{r['objective']:<11} {_params(r['params']):<42} {to} {r['step_s']:>6.3f} {r['steps']:>5} {gain:>13}"
        f" {r['peak_rss_mb']:>6.0f}{cuda} {sp}"
    )


def _params(p: dict) -> str:
    return " ".join(
        f"{AXES.get(k, (k,))[0]}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in p.items()
    )


def _table(res: dict, with_grid: bool = True) -> str:
    keys = [f"+{g:.0%}" for g in res["gains"]]
    cuda = " CUDA MB" if res["device"].startswith("cuda") else ""
    head = (
        f"{'objective':<11} {'settings':<42} "
        + " ".join(f"{'s steps/rolls ' + k:>18}" for k in keys)
        + f" {'s/step':>6} {'steps':>5} {'final/max':>13} {'RSS MB':>6}{cuda}"
    )
    lines = [
        f"time to reward, tiny task (seed {res['seed']}, {res['device']}, <= {res['max_steps']} steps / "
        f"{res['budget']} s each, {res['workers']} at a time)"
    ]
    if with_grid:
        lines += ["grid:", head] + [_row(r, keys, False) for r in res["grid"]]
    if res["best"]:
        lines += [
            "best per objective" + (" (rerun alone):" if res["workers"] > 1 else ":"),
            head + "  x grpo: s / steps / rollouts to " + keys[0],
        ]
        lines += [_row(r, keys, True) for r in res["best"].values()]
    lines.append(
        "-: not reached; steps/rolls: optimizer steps / rollouts (mu steps per rollout); evaluation every "
        "--eval_every steps, its time excluded; final/max: held-out gain at the last / best evaluation"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description="Time to reward of grpo, grpo+guard, nft and awm on the tiny task.")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--lr", dest="learning_rate", nargs="+", type=float, default=[3e-3], help="grid: learning rates")
    p.add_argument("--num_iterations", nargs="+", type=int, default=[1], help="grid: optimizer steps per rollout")
    p.add_argument("--train_timesteps", nargs="+", type=int, default=[2], help="grid (nft, awm): re-noised times")
    p.add_argument("--nft_beta", nargs="+", type=float, default=[1.0], help="grid (nft)")
    p.add_argument("--adv_clip_max", nargs="+", type=float, default=[0.3], help="grid (nft): A_max")
    p.add_argument(
        "--nft_adaptive_weight", nargs="+", type=lambda x: bool(int(x)), default=[True], help="grid (nft): 0 / 1"
    )
    p.add_argument("--gains", nargs="+", type=float, default=[0.05, 0.10, 0.20], help="levels: start + gain * |start|")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per run")
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--sampling_steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--workers", type=int, default=1, help="grid runs at a time (>1: the best are rerun alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (default fp32, as on CPU)")
    p.add_argument("--warmup_steps", type=int, default=2, help="CUDA only: untimed steps before each run")
    p.add_argument("--deadline", type=float, default=0, help="wall seconds after which no run starts (0: none)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--set", nargs="+", default=None, help="per objective: OBJ.FIELD=V1,V2 (e.g. awm.learning_rate=1e-3)"
    )
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.one is not None:
        job = json.loads(a.one)
        print(json.dumps(run_objective(argparse.Namespace(**job["a"]), job["name"], job["params"]), default=str))
        return 0
    a.t0 = time.time()
    res = compare_objectives(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(json.dumps(res, indent=2, default=str) if a.json else _table(res, with_grid=a.workers <= 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
