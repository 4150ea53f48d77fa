"""bench/gpu_check.py runs end to end on a CPU at the tiny shape, so the script a person with a GPU runs is tested."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_on_a_cpu_at_the_small_shape(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--shape", "small", "--skip_tests"]
    r = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "gpu_check.json"))
    assert res["device"].startswith("CPU") and res["shape"] == "small" and res["tests"]["status"] == "skipped"
    backends = res["rollout_per_backend"]["backends"]
    for name in ("native", "_native_math"):  # kernels a CPU has: a finite bf16 rollout each, timed
        assert backends[name]["status"] == "ok" and backends[name]["finite"] and backends[name]["rollout_s"] > 0
    assert backends["_native_cudnn"]["status"] == "unavailable"  # a CUDA-only kernel is reported, not fatal
    grpo = res["grpo"]
    assert grpo["status"] == "ok", grpo
    assert grpo["rollout_images_per_s"] > 0 and grpo["train_s"] > 0 and grpo["overhead_vs_bare_calls"] > 0
    assert grpo["memory"]["peak_rss_mb"] > 0
    assert res["dreamsim"]["status"] == "ok" and any("speed-up" in line for line in res["dreamsim"]["report"])
    table = open(tmp_path / "gpu_check.md").read()
    assert table.startswith("GPU check on CPU") and "| LoRA GRPO, group 8, bf16, checkpointing | ok |" in table
