"""The GPU check: one command that says whether the default GPU path works and what it costs at a real shape.

    python bench/gpu_check.py                                # on a CUDA GPU: the real FLUX.1-Kontext-dev shape
    python bench/gpu_check.py --device cpu --shape small      # the same steps on a CPU at a tiny shape (a test runs it)

Steps, each reported even when another fails:

1. ``tests/test_gpu.py`` (the tiny stages on CUDA in bf16 and fp32; skipped without a GPU);
2. one bf16 rollout (bf16 weights and autocast, an SDE window) per attention backend (cuDNN, flash, memory-efficient,
   math, and torch's own choice): finite or not, and seconds; a backend the device lacks is reported unavailable;
3. LoRA GRPO at the shape (``real``: FLUX.1-Kontext-dev's published transformer config, random bf16 weights built on
   the device, text embeddings of the real length; 512 px, group 8, gradient checkpointing): peak memory, rollout
   images/s, train step seconds and the step time over the bare transformer calls it needs (bench/grpo_step.py);
4. the same for every other editor the project has (none yet: reported as skipped);
5. batched patch DreamSim against a per-image loop (bench/rewards_throughput.py, random weights of the real width).

A step that needs more memory than the device has is reported as skipped with the reason. Writes ``gpu_check.json``
and ``gpu_check.md`` (the table docs/scaling.md quotes) under ``--out``, naming the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("WANDB_MODE", "disabled")

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # grpo_step, rewards_throughput

BACKENDS = ("_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "native")
# Transformer shapes for grpo_step.py: FLUX.1-Kontext-dev's published config (19 double + 38 single blocks, 24 heads
# of 128, T5 width 4096, guidance embedding), 512 px with 1,024 latent tokens per image; and a tiny one for CPUs.
SHAPES = {
    "real": dict(layers=19, single_layers=38, heads=24, head_dim=128, joint_dim=4096, text_len=512, codec_factor=8,
                 size=512, guidance_embeds=True, lora_rank=16, group=8, prompts=1),
    "small": dict(layers=1, single_layers=1, heads=2, head_dim=16, joint_dim=32, text_len=32, codec_factor=2,
                  size=32, guidance_embeds=True, lora_rank=4, group=8, prompts=1),
}  # fmt: skip


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def guarded(fn):
    """Run one step: its result, or why it did not give one (out of memory: skipped; anything else: error)."""
    start = time.perf_counter()
    try:
        out = fn()
        status = "ok"
    except Exception as err:  # noqa: BLE001 - one failing step must not stop the check
        status = "skipped" if out_of_memory(err) else "error"
        out = {"reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
        if status == "error":
            out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"status": status, "seconds": round(time.perf_counter() - start, 2), **out}


def gpu_tests() -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode not in (0, 5):
        raise RuntimeError(f"tests/test_gpu.py failed: {summary}")
    return {"summary": summary}


def rollout_per_backend(shape: dict, device: str) -> dict:
    """One bf16 rollout per attention backend at ``shape`` (4 steps, SDE window of 2, group of ``shape['group']``)."""
    import grpo_step
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from refiner_rl.data import TripletDataset, collate_triplets, synthetic_records
    from refiner_rl.policies.attention import set_attention_backend
    from refiner_rl.sampling import batch_conditions, sample_trajectories

    policy = grpo_step.bench_policy(grpo_step_args(shape, device))
    policy.to(device)
    data = TripletDataset(synthetic_records(1, size=shape["size"]), None, multiple=policy.codec.downsample * 2)
    batch = collate_triplets([data[0]] * shape["group"])
    batch["index"] = torch.zeros(shape["group"], dtype=torch.long)
    out = {}
    try:
        for name in BACKENDS:

            def run(name=name) -> dict:
                set_attention_backend(policy.transformer, name, device)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                    cond, _ = batch_conditions(policy, batch)
                    gen = torch.Generator(device).manual_seed(0)
                    start = time.perf_counter()
                    trajs, _, images = sample_trajectories(
                        policy, batch, cond, num_steps=4, generator=gen, sde_steps=[0, 1]
                    )
                    if torch.device(device).type == "cuda":
                        torch.cuda.synchronize(device)
                finite = bool(torch.isfinite(images).all() and all(torch.isfinite(t.log_probs).all() for t in trajs))
                return {"finite": finite, "rollout_s": round(time.perf_counter() - start, 3)}

            r = guarded(run)
            if r["status"] == "error" and "NumericsError" in r.get("reason", ""):
                r = {**r, "status": "ok", "finite": False}  # the rollout's own stop at a non-finite velocity
            elif r["status"] == "error":
                r["status"] = "unavailable"  # e.g. cuDNN or the memory-efficient kernel on a CPU
                r.pop("traceback", None)
            out[name] = r
    finally:
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    return out


def grpo_step_args(shape: dict, device: str) -> argparse.Namespace:
    """bench/grpo_step.py's command line for ``shape`` on ``device``: bf16, gradient checkpointing, 4 sampling steps
    with 2 trained, one warm-up and two timed steps."""
    import grpo_step

    argv = ["--device", device, "--dtype", "bfloat16", "--activation_checkpointing"]
    argv += ["--warmup", "1", "--iters", "2", "--sampling_steps", "4", "--trained_steps", "2"]
    for key, value in shape.items():
        if key == "guidance_embeds":
            argv += ["--guidance_embeds"] if value else []
        else:
            argv += [f"--{key}", str(value)]
    return grpo_step.build_parser().parse_args(argv)


def grpo_at_shape(shape: dict, device: str) -> dict:
    import grpo_step

    r = grpo_step.timed_run(grpo_step_args(shape, device), with_bare=True)
    images = shape["group"] * shape["prompts"]
    return {
        "tokens_per_sample": r["sequence_tokens"]["total"],
        "rollout_images_per_s": round(images / r["phases_s"]["rollout"], 3),
        "train_s": round(r["phases_s"]["train"], 3),
        "step_s": round(r["step_s"], 3),
        "overhead_vs_bare_calls": round(r["overhead"], 3),
        "memory": r["memory"],
    }


def dreamsim_batched(shape_name: str, device: str) -> dict:
    size = ["--model-size", "base", "--image-size", "512", "--batch", "8"] if shape_name == "real" else []
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "rewards_throughput.py"),
            "--device",
            device,
            *size,
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["rewards_throughput.py failed"])[-1])
    return {"report": [line for line in r.stdout.splitlines() if line.strip()][-4:]}


def markdown(res: dict) -> str:
    lines = [f"GPU check on {res['device']} (shape `{res['shape']}`, torch {res['torch']})", ""]
    lines += ["| step | status | result |", "|---|---|---|"]
    t = res["tests"]
    lines.append(f"| tests/test_gpu.py | {t['status']} | {t.get('summary', t.get('reason', ''))} |")
    for name, r in res["rollout_per_backend"].get("backends", {}).items():
        what = f"finite: {r['finite']}, {r['rollout_s']} s" if "finite" in r else r.get("reason", "")
        lines.append(f"| bf16 rollout, attention `{name}` | {r['status']} | {what} |")
    g = res["grpo"]
    if g["status"] == "ok":
        mem = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in g["memory"].items())
        lines.append(
            f"| LoRA GRPO, group 8, bf16, checkpointing | ok | {g['tokens_per_sample']} tokens/sample; rollout "
            f"{g['rollout_images_per_s']} images/s; train {g['train_s']} s; step {g['step_s']} s; "
            f"{g['overhead_vs_bare_calls']}x the bare calls; {mem} |"
        )
    else:
        lines.append(f"| LoRA GRPO, group 8, bf16, checkpointing | {g['status']} | {g.get('reason', '')} |")
    lines.append(f"| other editors | skipped | {res['other_editors']['reason']} |")
    d = res["dreamsim"]
    lines.append(
        f"| patch DreamSim, batched vs per image | {d['status']} | {'; '.join(d.get('report', [d.get('reason', '')]))} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: real on CUDA, small elsewhere")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--skip_tests", action="store_true", help="skip step 1 (tests/test_gpu.py)")
    a = p.parse_args(argv)
    shape_name = a.shape or ("real" if torch.device(a.device).type == "cuda" else "small")
    shape = SHAPES[shape_name]
    began = time.perf_counter()
    res = {"device": device_name(a.device), "shape": shape_name, "torch": torch.__version__, "shape_config": shape}
    skipped = {"status": "skipped", "reason": "--skip_tests"}
    res["tests"] = skipped if a.skip_tests else guarded(gpu_tests)
    res["rollout_per_backend"] = guarded(lambda: {"backends": rollout_per_backend(shape, a.device)})
    res["grpo"] = guarded(lambda: grpo_at_shape(shape, a.device))
    res["other_editors"] = {"status": "skipped", "reason": "the project has no editor besides FLUX.1-Kontext yet"}
    res["dreamsim"] = guarded(lambda: dreamsim_batched(shape_name, a.device))
    res["seconds"] = round(time.perf_counter() - began, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    table = markdown(res)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table + f"\n{res['seconds']} s; written to {a.out}/gpu_check.json and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
