"""How far each learning test's asserted figures sit from their thresholds, over seeds and numeric conditions.

A learning test trains a tiny model and asserts a figure against a threshold (a reward gain, a loss ratio, an
accuracy). One run on one machine says little: the same test on another CPU rounds its matrix products differently
and can land elsewhere. This script runs the learning tests themselves (pytest, so nothing is re-implemented here)
once per seed and numeric condition, with

- ``REFINER_RL_LEARNING_SEED``: the seed of each test's model draw, data and noise (tests/helpers.py; 0 in CI);
- ``REFINER_RL_LEARNING_FIGURES``: a file where each test appends every figure it would assert (value, comparison,
  threshold) instead of asserting it, so every figure of a run is measured; a run fails here when pytest fails or
  any figure misses its threshold;
- the condition's environment: ``native`` (the machine as it is), ``avx2`` (ATen's AVX2 kernels, when the CPU has
  AVX-512) and ``scalar`` (ATen's non-vectorised kernels, oneDNN limited to SSE4.1, MKL's bit-compatible mode):
  each changes the rounding of matrix products, convolutions, softmax and GELU.

It prints, per figure: the worst and median value over all runs, the threshold, and the margin (how far the worst
value clears the threshold, relative to the threshold's scale), then writes the same table as markdown.

    python bench/learning_margins.py                                  # 5 seeds x (native, scalar), every training
    python bench/learning_margins.py --trainings judge refl_judge --seeds 0 1 2 3 4 5 6 7
    python bench/learning_margins.py --jobs 2 --out learning_margins.md

Each run uses one torch thread (the learning tests' own setting), so ``--jobs 2`` fits a 2-core machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import operator
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# training -> the pytest node ids whose figures it measures
TRAININGS = {
    "sft": ["tests/test_sft.py::test_sft_loss_falls_on_the_tiny_model"],
    "grpo": ["tests/test_grpo_learning.py"],
    "nft": [
        "tests/test_objectives_learning.py::test_reward_rises_held_out_improves_and_negated_weights_reverse_it[nft]"
    ],
    "awm": [
        "tests/test_objectives_learning.py::test_reward_rises_held_out_improves_and_negated_weights_reverse_it[awm]"
    ],
    "refl": [
        "tests/test_refl_trainer.py::test_refl_improves_the_held_out_reward_and_masked_mse",
        "tests/test_refl_trainer.py::test_reversed_reward_moves_the_held_out_reward_the_other_way",
    ],
    "fill_refl": ["tests/test_fill_refl.py"],
    "planner_sft": ["tests/test_planner_sft.py"],
    "judge": [  # the judge and the ReFL runs that learn from it: one pytest process trains the judge once
        "tests/test_onereward_judge_training.py::test_judge_learns_the_preferences_well_above_chance_on_held_out_pairs",
        "tests/test_refl_judge.py::test_refl_from_the_trained_judge_moves_its_held_out_reward_both_ways",
        "tests/test_refl_judge.py::test_refl_from_a_fine_tuned_editor_reversed_judge_raises_the_masked_mse_judge_does_not",
    ],
    "reference_judge": ["tests/test_onereward_reference_judge.py"],  # the judge that compares with the reference
    "planner": ["tests/test_planner_grpo.py::test_grpo_raises_the_format_reward_and_keeps_f1"],
    "unaligned": ["tests/test_unaligned.py::test_the_model_uses_a_shifted_reference"],
    "registration": ["tests/test_registration.py::test_registration_finds_the_transform_and_lines_the_detail_up"],
}

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
CONDITIONS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}


def cpu_capability() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def run_one(training: str, condition: str, seed: int, folder: str, timeout: float) -> dict:
    """One pytest run of a training's tests; its figures (JSON lines) and outcome."""
    figures = os.path.join(folder, f"{training}-{condition}-{seed}.jsonl")
    env = {
        **os.environ,
        **CONDITIONS[condition],
        "REFINER_RL_LEARNING_SEED": str(seed),
        "REFINER_RL_LEARNING_FIGURES": figures,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", figures + ".tmp"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd + TRAININGS[training], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, tail = proc.returncode, proc.stdout.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        code, tail = -1, [f"timed out after {timeout:.0f}s"]
    rows = [json.loads(line) for line in open(figures)] if os.path.exists(figures) else []
    missed = [f["figure"] for f in rows if not OPS[f["op"]](f["value"], f["threshold"])]
    if missed:
        tail = [f"missed: {', '.join(missed)}"]
    return {
        "training": training,
        "condition": condition,
        "seed": seed,
        "passed": code == 0 and not missed,
        "summary": tail[0],
        "seconds": time.perf_counter() - start,
        "figures": rows,
    }


def margin(worst: float, op: str, threshold: float) -> float:
    """How far the worst value clears the threshold (negative: it fails), relative to max(|threshold|, 0.01), so
    that a 0.05 gain threshold and a 13-of-16 count read alike."""
    scale = max(abs(threshold), 0.01)
    return (worst - threshold) / scale if op in (">", ">=") else (threshold - worst) / scale


def table(results: list[dict]) -> list[str]:
    by_figure: dict[str, list] = {}
    for r in results:
        for f in r["figures"]:
            by_figure.setdefault((r["training"], f["figure"]), []).append(f)
    lines = [
        "| training | figure | runs | missed | worst | median | best | threshold | margin of the worst |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (training, name), rows in by_figure.items():
        values = [f["value"] for f in rows]
        op, threshold = rows[0]["op"], rows[0]["threshold"]
        higher = op in (">", ">=")
        worst, best = (min(values), max(values)) if higher else (max(values), min(values))
        missed = sum(not OPS[op](v, threshold) for v in values)
        lines.append(
            f"| {training} | {name} | {len(values)} | {missed} | {worst:.4g} | {statistics.median(values):.4g} | {best:.4g} | "
            f"{op} {threshold:.4g} | {margin(worst, op, threshold):+.0%} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainings", nargs="+", default=list(TRAININGS), choices=list(TRAININGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        choices=list(CONDITIONS),
        help="numeric conditions (default: native and scalar, plus avx2 on an AVX-512 CPU)",
    )
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="pytest runs at a time")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one pytest run")
    p.add_argument("--out", default=None, help="also write the table (markdown) and the raw runs (.json) here")
    args = p.parse_args()

    native = cpu_capability()
    conditions = args.conditions or ["native", "scalar"] + (["avx2"] if native.startswith("AVX512") else [])
    print(f"CPU capability {native}; conditions {conditions}; seeds {args.seeds}; {args.jobs} job(s)", flush=True)
    folder = tempfile.mkdtemp(prefix="learning-margins-")
    jobs = list(itertools.product(args.trainings, conditions, args.seeds))
    results, began = [], time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda j: run_one(*j, folder, args.timeout), jobs):
            results.append(r)
            state = "passed" if r["passed"] else f"FAILED ({r['summary']})"
            print(f"{r['training']} {r['condition']} seed {r['seed']}: {state}, {r['seconds']:.0f}s", flush=True)
    lines = table(results)
    failed = [f"{r['training']}/{r['condition']}/{r['seed']}" for r in results if not r["passed"]]
    lines += [
        "",
        f"{len(results) - len(failed)} of {len(results)} runs passed" + (f"; failed: {failed}" if failed else ""),
    ]
    lines.append(f"{time.perf_counter() - began:.0f}s in all; CPU capability {native}; conditions {conditions}")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
