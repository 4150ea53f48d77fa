"""The memory part of bench/grpo_step.py, and the fresh-process probe its timed settings use for their peak memory.

:func:`probe` runs one setting of bench/grpo_step.py alone in a fresh process (its ``--probe`` mode), so a peak RSS
(the process's VmHWM) belongs to that setting only. :func:`memory_compare` compares one backward per trained step
with one backward over all of them in such processes, alternating their order over rounds, and measures the import
floors: the resident memory of a fresh process after only a diffusers + accelerate + peft loop's imports
(:data:`PEER_IMPORTS`), and after ours on top. Run through ``python bench/grpo_step.py --skip breakdown overhead
window ttr`` (its docstring has the peer-shape command line).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

GRPO_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_step.py")
# the memory part's two backward modes: FlowGRPOConfig overrides
BACKWARDS = {"per_step": {"backward_per_step": True}, "single": {"backward_per_step": False}}


def probe(a, argv: list[str], overrides: dict, steps: int | None = None, env: dict | None = None) -> dict:
    """Train one setting alone in a fresh process (bench/grpo_step.py with ``--probe``): its per-step times and peak
    memory. ``steps`` replaces ``warmup + iters`` (warmup 1); ``env``: extra environment variables."""
    extra = ["--probe", json.dumps(overrides)]
    if steps is not None:
        extra += ["--warmup", "1", "--iters", str(max(1, steps - 1))]
    cmd = [sys.executable, GRPO_STEP, *argv, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), **(env or {}))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"probe {overrides} failed (rc={res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


# What a training loop written directly on diffusers + accelerate + peft imports (flow_grpo's Kontext loop: the
# pipeline with its text encoders and VAE, accelerate, peft; DeepSpeed where installed, since accelerate's
# unwrap_model imports it). OUR_IMPORTS adds what this trainer imports on top: transformers' Trainer, which imports
# `datasets` (with pandas and pyarrow), TRL and refiner_rl.
PEER_IMPORTS = """
import torch, accelerate, peft
from accelerate import Accelerator
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel
try:
    import deepspeed
except ImportError:
    pass
"""
OUR_IMPORTS = """
from transformers import Trainer
from trl.trainer.utils import RepeatSampler
from refiner_rl.data import TripletDataset
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
"""
_PRINT_RSS = 'print(next(int(s.split()[1]) for s in open("/proc/self/status") if s.startswith("VmRSS:")) / 1024)'


def import_floor(a, code: str) -> float:
    """Resident MB of a fresh process after only the imports in ``code`` (Linux)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-c", code + _PRINT_RSS], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"import probe failed (rc={res.returncode}):\n{res.stderr[-2000:]}")
    return float(res.stdout.split()[-1])


def memory_settings(a) -> dict[str, tuple[dict, dict]]:
    """The memory part's settings: name -> (config overrides, environment). With ``--malloc_mmap_threshold N``
    also the per-step backward under glibc's ``MALLOC_MMAP_THRESHOLD_=N`` (blocks of N bytes and more are mapped
    and returned to the system when freed, instead of staying in the heap)."""
    out = {k: (ov, {}) for k, ov in BACKWARDS.items()}
    if a.malloc_mmap_threshold:
        out["per_step_mmap"] = (BACKWARDS["per_step"], {"MALLOC_MMAP_THRESHOLD_": str(a.malloc_mmap_threshold)})
    return out


def memory_compare(a, argv: list[str]) -> dict:
    """One backward per trained step vs one over all of them: fresh processes, alternating order per round;
    per setting the median over rounds of peak RSS (CUDA peak) and of each run's median step time."""
    settings = memory_settings(a)
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    for r in range(a.memory_rounds):
        for k in list(settings) if r % 2 == 0 else list(settings)[::-1]:
            runs[k].append(probe(a, argv, settings[k][0], env=settings[k][1]))
    out: dict = {"rounds": a.memory_rounds, "sequence_tokens": runs["per_step"][0]["sequence_tokens"]}
    for k, rs in runs.items():
        mem = {m: statistics.median(x["memory"][m] for x in rs) for m in rs[0]["memory"]}
        out[k] = {
            "step_s": statistics.median(x["step_median_s"] for x in rs),
            **mem,
            "runs": [{"step_s": x["step_median_s"], **x["memory"]} for x in rs],
        }
    out["rss_ratio"] = out["per_step"]["peak_rss_mb"] / out["single"]["peak_rss_mb"]
    out["time_ratio"] = out["per_step"]["step_s"] / out["single"]["step_s"]
    # Import floors in fresh processes (medians over rounds): a diffusers + accelerate + peft loop's, and ours (the
    # same imports plus Trainer, datasets, TRL, refiner_rl). The difference is paid before anything is built.
    floor = {
        "peer_mb": statistics.median(import_floor(a, PEER_IMPORTS) for _ in range(a.memory_rounds)),
        "ours_mb": statistics.median(import_floor(a, PEER_IMPORTS + OUR_IMPORTS) for _ in range(a.memory_rounds)),
    }
    floor["difference_mb"] = floor["ours_mb"] - floor["peer_mb"]
    out["import_floor"] = floor
    if a.compare_rss_mb:
        out["rss_vs_given"] = {k: out[k]["peak_rss_mb"] / a.compare_rss_mb for k in settings}
        # Our peak less the extra import floor, against the given peak (which paid only the peer's floor).
        out["rss_vs_given_same_floor"] = {
            k: (out[k]["peak_rss_mb"] - floor["difference_mb"]) / a.compare_rss_mb for k in settings
        }
    return out
