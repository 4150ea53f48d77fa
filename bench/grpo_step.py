"""Where a GRPO step's time goes, how much the trainer adds to the transformer calls, and what the SDE window
and our learning settings buy: five measurements that share one trainer builder and one timing loop, so their
figures compare. The fresh-process memory probe and the memory part are in bench/grpo_memory.py, the time to reward
in bench/grpo_ttr.py.

    python bench/grpo_step.py                                   # tiny shapes, CPU, all five parts
    python bench/grpo_step.py --json                            # the same, one JSON object on stdout
    python bench/grpo_step.py --layers 2 --single_layers 2 --heads 4 --head_dim 32 --size 32 --skip ttr
    # memory: one backward per trained step vs one over all of them, at a peer's shape: the bench's transformer,
    # 64 px with 3,200 tokens per sample (3 x 1024 image + 128 text), LoRA r8, 6 sampling steps with 5 trained
    python bench/grpo_step.py --skip breakdown overhead window ttr --size 64 --codec_factor 1 --text_len 128 \
        --lora_rank 8 --sampling_steps 6 --trained_steps 5 --prompts 1 --threads 2 --compare_rss_mb 1215 \
        --malloc_mmap_threshold 262144

One run prints five parts:

1. breakdown: the step's wall time split into rollout / reward / advantages / train (loss forward +
   backward) / other (optimizer step, Trainer loop, logging), and the peak RSS (and CUDA peak memory);
2. overhead: GRPO step wall time / the bare transformer calls that step needs at the same shapes (the
   rollout's no-grad forwards, the trained steps' forward + backward, the KL reference forwards). The two
   are measured interleaved (a bare set before every GRPO step, inside the same training run), because a
   shared machine drifts by +-20% within a minute. Target <= 1.10;
3. window: step time with a 2-step SDE window (sliding or fixed; and sliding with a coarse ODE tail after
   the window, ``rollout_tail_steps``) vs training 9 of 10 steps (every step but the last), same shapes
   otherwise. Target >= 3x;
4. ttr (time to reward): on the tiny task, training wall time (held-out evaluation excluded) until the
   held-out reward reaches a fixed level (default: 5% better than the shared starting policy), for our
   settings vs peer-like ones (every step stochastic, all but the last trained, one advantage per image).
   Target >= 3x;
5. memory: peak memory and step time of one backward per trained step (what training does) vs one backward
   over all trained steps (``FlowGRPOTrainer.backward_per_step = False``), each run in a fresh process
   (peak RSS = the process's VmHWM; on CUDA also ``torch.cuda.max_memory_allocated``), alternating for
   ``--memory_rounds`` rounds; medians. Also the import floors (resident memory before anything is built): ours
   and a loop written on diffusers + accelerate + peft only (bench/grpo_memory.py); with ``--compare_rss_mb``
   our peak less that difference is compared with the given figure too.

Every timed setting reports its peak memory: the breakdown's from its own process; each window setting and
each memory setting from a fresh process running it alone (``--probe_steps`` steps).

CPU timings on a shared machine are noisy: compare numbers from the same run, and repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time

# The bench reports to stdout only (and --json must be one JSON object there): no W&B, whose offline mode makes
# transformers print a banner on import.
os.environ["WANDB_MODE"] = "disabled"

import torch
from grpo_memory import BACKWARDS, memory_compare, probe  # bench/grpo_memory.py (this folder is on sys.path)
from grpo_ttr import time_to_reward  # bench/grpo_ttr.py (this folder is on sys.path when run as a script)
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.policies import KontextPolicy
from refiner_rl.policies.flux import DEFAULT_LORA_TARGETS
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer

PARTS = ("breakdown", "overhead", "window", "ttr", "memory")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Even RoPE axis sizes that sum to ``head_dim`` (index, row, col), like Flux's (16, 56, 56) for 128."""
    a = max(2, head_dim // 4 // 2 * 2)
    b = (head_dim - a) // 2 // 2 * 2
    return a, b, head_dim - a - b


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def bench_policy(a) -> KontextPolicy:
    """The policy at the command line's shape, its random weights drawn directly on ``a.device`` in ``a.dtype``: a
    real-size transformer (FLUX.1-Kontext-dev's 12B parameters) never exists in fp32 or on the CPU."""
    torch.manual_seed(a.seed)
    dtype = getattr(torch, getattr(a, "dtype", "float32"))
    with torch.device(a.device), _default_dtype(dtype):
        policy = KontextPolicy.tiny(
            dtype=dtype,
            num_layers=a.layers,
            num_single_layers=a.single_layers,
            num_attention_heads=a.heads,
            attention_head_dim=a.head_dim,
            joint_attention_dim=a.joint_dim,
            axes_dims_rope=rope_axes(a.head_dim),
            text_max_length=a.text_len,
            codec_factor=a.codec_factor,
            guidance_embeds=a.guidance_embeds,
        )
    return policy


def build_trainer(a, out_dir: str, **overrides) -> FlowGRPOTrainer:
    """A trainer at the shapes of the command line; ``overrides`` replace config fields."""
    policy = bench_policy(a)
    dtype = policy.dtype
    if a.lora_rank > 0:
        policy.add_lora(rank=a.lora_rank, target_modules=a.lora_targets.split(","))
    policy.to(a.device)
    batch = a.group * a.prompts
    cfg = dict(
        output_dir=out_dir,
        max_steps=a.warmup + a.iters,
        per_device_train_batch_size=batch,
        num_generations=a.group,
        num_inference_steps=a.sampling_steps,
        sde_window_size=a.trained_steps,
        sde_type=a.sde_type,
        noise_level=0.7 if a.sde_type == "cps" else 0.9,
        beta=a.beta,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        start_sigma=a.start_sigma,
        paste_back=a.start_sigma < 1,
        seed=a.seed,
        logging_steps=1,
        rewards=[{"name": "masked_pixel"}],
        report_to="none",
        use_cpu=a.device == "cpu",
        disable_tqdm=True,
        save_strategy="no",
        log_samples=False,
        bf16=dtype == torch.bfloat16,
        activation_checkpointing=bool(getattr(a, "activation_checkpointing", False)),
    )
    overrides = dict(overrides)
    per_step = overrides.pop("backward_per_step", True)
    cfg.update(overrides)
    args = FlowGRPOConfig(**cfg)
    records = synthetic_records(max(a.records, a.prompts), seed=a.seed, size=a.size)
    train = TripletDataset(records, None, multiple=policy.codec.downsample * 2)
    trainer = FlowGRPOTrainer(policy, args=args, train_dataset=train)
    trainer.backward_per_step = per_step
    trainer.remove_callback(PrinterCallback)  # keep stdout for the report
    return trainer


def sequence_tokens(trainer: FlowGRPOTrainer) -> dict:
    """Tokens of one sample's transformer sequence: target + draft + reference image tokens + text."""
    batch = next(iter(trainer.get_train_dataloader()))
    cond, _ = trainer._conditions({k: v[:1] for k, v in batch.items()})
    image, text = cond.num_target_tokens + cond.tokens.shape[1], cond.text.prompt_embeds.shape[1]
    return {"image": image, "text": text, "total": image + text}


def bare_calls(trainer: FlowGRPOTrainer):
    """The transformer calls of one GRPO step at its shapes, with nothing around them: the rollout's no-grad
    forwards (per micro-batch), and per trained step a forward + backward and, with ``beta > 0``, the
    reference forward (the adapter disabled, or the frozen copy)."""
    args, policy, model = trainer.args, trainer.policy, trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    cond, _ = trainer._conditions(batch)
    dev, dtype = policy.device, policy.dtype
    cfg = args.true_cfg_scale > 1
    guided = getattr(policy.transformer.config, "guidance_embeds", False)  # FLUX.1-Kontext-dev has it

    def inputs(b: int) -> dict:
        c = cond.select(slice(0, b))
        x = torch.randn(b, c.num_target_tokens, c.tokens.shape[-1], device=dev)
        hidden = torch.cat([x, c.tokens], 1).to(dtype)
        seq, pooled = c.text.prompt_embeds, c.text.pooled
        if cfg:
            hidden, seq, pooled = (
                torch.cat([hidden, hidden]),
                torch.cat([seq, c.negative.prompt_embeds]),
                torch.cat([pooled, c.negative.pooled]),
            )
        rows = hidden.shape[0]
        return dict(
            hidden_states=hidden,
            encoder_hidden_states=seq.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=torch.full((rows,), 0.5, device=dev, dtype=dtype),
            img_ids=torch.cat([c.target_ids, c.ids]).to(dtype),
            txt_ids=torch.zeros(seq.shape[1], 3, device=dev, dtype=dtype),
            # as KontextPolicy.velocity passes it to a guidance-distilled transformer
            guidance=torch.full((rows,), float(policy.guidance_scale), device=dev) if guided else None,
            return_dict=False,
        )

    n = cond.tokens.shape[0]
    roll = [inputs(min(args.rollout_batch_size, n - i)) for i in range(0, n, args.rollout_batch_size)]
    train = inputs(args.per_device_train_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    k = args.sde_window_size

    def run() -> None:
        with torch.no_grad():
            for inp in roll:
                for _ in range(args.num_inference_steps):
                    model(**inp)
        for _ in range(k):
            out = model(**train)[0]
            out.float().pow(2).mean().backward()
            if args.beta > 0:
                with torch.no_grad():
                    if trainer.ref_transformer is not None:
                        trainer.ref_transformer(**train)
                    else:
                        with policy.adapter_disabled(model):
                            model(**train)
        for p in params:
            p.grad = None
        _sync(dev)

    return run


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (from the end of the previous bare set to the next step's start),
    with an optional bare set timed just before each step: GRPO and bare calls alternate."""

    def __init__(self, bare=None, device="cpu"):
        self.bare, self.device = bare, device
        self.steps: list[float] = []
        self.bares: list[float] = []
        self._end: float | None = None

    def _close(self) -> None:
        _sync(self.device)
        if self._end is not None:
            self.steps.append(time.perf_counter() - self._end)

    def on_step_begin(self, args, state, control, **kwargs):
        self._close()
        if self.bare is not None:
            t = time.perf_counter()
            self.bare()
            self.bares.append(time.perf_counter() - t)
        self._end = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        self._end = None


def timed_run(a, with_bare: bool, **overrides) -> dict:
    """Train ``warmup + iters`` steps; per-step medians over the last ``iters`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(a, tmp, **overrides)
        clock = StepClock(bare_calls(trainer) if with_bare else None, a.device)
        trainer.add_callback(clock)
        if torch.device(a.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        tokens = sequence_tokens(trainer)
    w = a.warmup
    t = trainer.timings
    # Means, so that the phases add up to the step (one rollout and one micro-step per optimizer step here).
    per_step = {k: statistics.fmean(t[k][w:]) for k in ("rollout", "reward", "advantages", "train")}
    step = statistics.fmean(clock.steps[w:])
    per_step["other"] = step - sum(per_step.values())
    out = {
        "step_s": step,
        "step_median_s": statistics.median(clock.steps[w:]),
        "phases_s": per_step,
        "steps_s": clock.steps[w:],
        "sequence_tokens": tokens,
        "memory": peak_memory(a.device),
    }
    if with_bare:
        out["bare_s"] = statistics.fmean(clock.bares[w:])
        # ratio per interleaved pair, then the median: pairs share the machine's load of the moment
        out["overhead"] = statistics.median(s / b for s, b in zip(clock.steps[w:], clock.bares[w:]))
    return out


def _forever(loader):
    while True:
        yield from loader


def interleaved_steps(a, configs: dict[str, dict]) -> dict[str, dict]:
    """Optimizer steps of several trainers taken in turn (one step each, round after round), so that the
    machine's drift hits them alike. Steps are driven by hand (rollout + loss + backward + AdamW step), without
    the Trainer loop around them. Per config: median step time and mean phase times over the timed rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {k: build_trainer(a, os.path.join(tmp, k), **ov) for k, ov in configs.items()}
        loaders = {}
        for k, t in trainers.items():
            t.create_optimizer()
            t.current_gradient_accumulation_steps = 1
            t.model.train()
            loaders[k] = _forever(t.get_train_dataloader())
        times: dict[str, list[float]] = {k: [] for k in configs}
        cuda = torch.device(a.device).type == "cuda"
        cuda_peak = dict.fromkeys(configs, 0.0)
        for _ in range(a.warmup + a.iters):
            for k, t in trainers.items():
                batch = next(loaders[k])
                _sync(a.device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                t.training_step(t.model, batch)
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
                _sync(a.device)
                times[k].append(time.perf_counter() - t0)
                if cuda:  # this step's peak, above the other trainers' resident weights and optimizer states
                    cuda_peak[k] = max(cuda_peak[k], torch.cuda.max_memory_allocated() / 2**20)
    w = a.warmup
    out = {}
    for k, t in trainers.items():
        phases = {p: statistics.fmean(t.timings[p][w:]) for p in ("rollout", "reward", "advantages", "train")}
        out[k] = {"step_s": statistics.median(times[k][w:]), "phases_s": phases}
        if cuda:
            out[k]["cuda_peak_allocated_mb"] = cuda_peak[k]
    return out


def peak_memory(device) -> dict:
    """This process's peak resident memory (Linux: VmHWM of its own address space, which a fresh ``exec``
    starts anew; ``ru_maxrss`` can carry the parent's peak over a fork) and, on CUDA, the peak allocated since
    the last ``reset_peak_memory_stats``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    out = {"peak_rss_mb": rss}
    if torch.device(device).type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_probe(a) -> dict:
    """The ``--probe`` child: ``warmup + iters`` steps of the setting, no bare calls. ``import_rss_mb``: the
    resident memory before anything is built (torch, transformers' Trainer, diffusers... imported)."""
    imported = peak_memory("cpu")["peak_rss_mb"]
    r = timed_run(a, with_bare=False, **json.loads(a.probe))
    r["memory"]["import_rss_mb"] = imported
    return {k: r[k] for k in ("step_s", "step_median_s", "steps_s", "sequence_tokens", "memory")}


# ------------------------------------------------------------------------------------------------- report
def _fmt_table(res: dict) -> str:
    lines = []
    if "breakdown" in res:
        b = res["breakdown"]
        tok = b["sequence_tokens"]
        lines += [
            f"step-time breakdown (mean s per optimizer step; {tok['total']} tokens per sample: "
            f"{tok['image']} image + {tok['text']} text)",
            "-" * 48,
        ]
        for k, v in b["phases_s"].items():
            lines.append(f"  {k:<12}{v:>10.4f}  {v / b['step_s']:>6.1%}")
        lines.append(f"  {'step':<12}{b['step_s']:>10.4f}")
        lines.append(
            f"  peak RSS {res['memory']['peak_rss_mb']:.0f} MB"
            + (
                f", CUDA peak {res['memory']['cuda_peak_allocated_mb']:.0f} MB"
                if "cuda_peak_allocated_mb" in res["memory"]
                else ""
            )
        )
    if "overhead" in res:
        o = res["overhead"]
        lines += [
            "",
            (
                f"overhead: GRPO step {o['step_s']:.4f} s / bare transformer calls {o['bare_s']:.4f} s (means); "
                f"median ratio of interleaved pairs {o['overhead']:.3f} (target <= 1.10)"
            ),
        ]
    if "window" in res:
        w = res["window"]
        lines += [
            "",
            f"SDE window, {w['sampling_steps']} sampling steps (median s per step, interleaved; target >= 3x):",
            f"  9 trained (all but the last), independent noise  {w['all_but_last_s']:.4f}",
        ]
        for k, label in (
            ("window_2_sliding", "2 trained, sliding in the noisier half, shared noise"),
            ("window_2_at_0", "2 trained, fixed at step 0, shared noise"),
            ("window_2_sliding_tail", f"  the sliding one + {w['tail_steps']}-step ODE tail"),
        ):
            lines.append(
                f"  {label:<49}{w[k + '_s']:.4f}  -> {w['speedup_' + k]:.2f}x (train phase {w['train_speedup_' + k]:.2f}x)"
            )
    if "window" in res:
        lines.append("  peak RSS of each setting alone (MB): " + _fmt_mem(res["window"]["memory"]))
    if "memory_backward" in res:
        m = res["memory_backward"]
        tok = m["sequence_tokens"]
        lines += [
            "",
            f"backward per trained step vs one over all (fresh processes, medians of {m['rounds']} rounds; "
            f"{tok['total']} tokens per sample):",
        ]
        for k in memory_settings_names(m):
            cuda = f", CUDA peak {m[k]['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in m[k] else ""
            given = (
                f" ({m['rss_vs_given'][k]:.2f}x the given {res['args']['compare_rss_mb']:.0f} MB)"
                if ("rss_vs_given" in m)
                else ""
            )
            lines.append(
                f"  {k:<9} {m[k]['step_s']:.3f} s/step, peak RSS {m[k]['peak_rss_mb']:.0f} MB{given}{cuda}, "
                f"{m[k]['peak_rss_mb'] - m[k]['import_rss_mb']:.0f} MB above the imports"
            )
        lines.append(f"  per_step / single: RSS {m['rss_ratio']:.3f}x, time {m['time_ratio']:.3f}x")
        f = m["import_floor"]
        lines.append(
            f"  import floor: ours {f['ours_mb']:.0f} MB, a diffusers + accelerate + peft loop's {f['peer_mb']:.0f} MB "
            f"(+{f['difference_mb']:.0f} MB: transformers' Trainer with datasets, TRL, refiner_rl)"
        )
        if "rss_vs_given_same_floor" in m:
            same = m["rss_vs_given_same_floor"]
            lines.append(
                "  peak less the extra floor vs the given: "
                + ", ".join(f"{k} {m[k]['peak_rss_mb'] - f['difference_mb']:.0f} MB ({same[k]:.2f}x)" for k in same)
            )
    if "ttr" in res:
        t = res["ttr"]
        lines += ["", f"time to reward: held-out reward {t['start_reward']:.5f} -> level {t['level']:.5f}"]
        for name, r in t["runs"].items():
            s = r["seconds_to_level"]
            reached = f"{s:.1f} s" if s is not None else "not reached"
            lines.append(f"  {name:<18} {reached:>12}  (trained {r['train_s']} s)")
        sp = t["speedup"]
        lines.append(f"  speed-up: {sp if isinstance(sp, str) or sp is None else f'{sp:.2f}x'} (target >= 3x)")
    return "\n".join(lines)


def memory_settings_names(m: dict) -> list[str]:
    """The settings a memory result holds (``per_step``, ``single``, optionally ``per_step_mmap``)."""
    return [k for k in (*BACKWARDS, "per_step_mmap") if k in m]


def _fmt_mem(mem: dict) -> str:
    return ", ".join(f"{k} {v['peak_rss_mb']:.0f}" for k, v in mem.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("transformer")
    g.add_argument("--layers", type=int, default=1, help="double-stream (MM-DiT) blocks")
    g.add_argument("--single_layers", type=int, default=1, help="single-stream blocks")
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--head_dim", type=int, default=16)
    g.add_argument("--joint_dim", type=int, default=32, help="text embedding width (T5 d_model of the tiny encoder)")
    g.add_argument("--text_len", type=int, default=32, help="text tokens (the tiny T5's max_sequence_length)")
    g.add_argument("--codec_factor", type=int, default=2, help="pixels per latent side of the lossless codec")
    g.add_argument("--guidance_embeds", action="store_true", help="a guidance-distilled transformer (as Kontext-dev)")
    g.add_argument("--lora_rank", type=int, default=16, help="0 = full fine-tuning")
    g.add_argument("--lora_targets", default=",".join(DEFAULT_LORA_TARGETS))
    g.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="transformer weights (+ autocast)"
    )
    g.add_argument("--activation_checkpointing", action="store_true", help="diffusers' gradient checkpointing")
    g = p.add_argument_group("step")
    g.add_argument(
        "--size",
        type=int,
        default=16,
        help="image side in pixels: (size / codec_factor / 2)^2 tokens per image, 3 images + text per sample",
    )
    g.add_argument("--group", type=int, default=4, help="num_generations")
    g.add_argument("--prompts", type=int, default=4, help="conditions per step")
    g.add_argument("--sampling_steps", type=int, default=4)
    g.add_argument("--trained_steps", type=int, default=2, help="SDE window size")
    g.add_argument(
        "--tail_steps", type=int, default=2, help="window part: rollout_tail_steps of the coarse-tail variant"
    )
    g.add_argument("--sde_type", default="flow_sde", choices=["flow_sde", "cps", "dance"])
    g.add_argument("--beta", type=float, default=0.01)
    g.add_argument("--start_sigma", type=float, default=1.0)
    g.add_argument("--records", type=int, default=64, help="synthetic training triplets")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--iters", type=int, default=8, help="timed steps per measurement")
    g = p.add_argument_group("time to reward")
    g.add_argument("--ttr_sampling_steps", type=int, default=4)
    g.add_argument("--ttr_lr", type=float, default=3e-3)
    g.add_argument("--ttr_gain", type=float, default=0.05, help="level = start + gain * |start|")
    g.add_argument("--ttr_eval_every", type=int, default=10)
    g.add_argument("--ttr_budget", type=float, default=120.0, help="training seconds per setting")
    g.add_argument("--ttr_max_steps", type=int, default=1000)
    g.add_argument("--ttr_ablations", action="store_true", help="also peer-like + each of our changes alone")
    g = p.add_argument_group("memory")
    g.add_argument("--memory_rounds", type=int, default=3, help="fresh-process runs per backward mode")
    g.add_argument("--probe_steps", type=int, default=2, help="steps of each window setting's memory probe")
    g.add_argument("--compare_rss_mb", type=float, default=None, help="a peak RSS to compare with (e.g. a peer's)")
    g.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=None,
        help="bytes: also run the per-step setting with glibc's MALLOC_MMAP_THRESHOLD_ set to this (e.g. 262144)",
    )
    g.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one setting, JSON overrides
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny shapes on a shared CPU)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)

    torch.set_num_threads(a.threads)
    logging.disable(logging.WARNING)
    if a.probe is not None:
        print(json.dumps(run_probe(a)))
        return 0
    res: dict = {"args": vars(a), "device": a.device}
    if "breakdown" not in a.skip or "overhead" not in a.skip:
        r = timed_run(a, with_bare="overhead" not in a.skip)
        res["breakdown"] = {k: r[k] for k in ("step_s", "phases_s", "sequence_tokens")}
        res["memory"] = r["memory"]
        if "overhead" not in a.skip:
            res["overhead"] = {k: r[k] for k in ("step_s", "bare_s", "overhead")}
    if "window" not in a.skip:
        # 10 sampling steps. Ours: 2 trained steps sliding over the noisier half (MixGRPO), one initial noise per
        # group (so the ODE steps before the window run once per group); also the same window fixed at step 0.
        # The first with a coarse ODE tail (`rollout_tail_steps`, default 2) after the window as well.
        # Peer-like: every step but the last trained, independent initial noise.
        a10 = argparse.Namespace(**{**vars(a), "sampling_steps": 10})
        configs = {
            "window_2_sliding": dict(
                sde_window_size=2, sde_window_mode="sliding", sde_window_max_start=4, shared_initial_noise=True
            ),
            "window_2_at_0": dict(sde_window_size=2, shared_initial_noise=True),
            "window_2_sliding_tail": dict(
                sde_window_size=2,
                sde_window_mode="sliding",
                sde_window_max_start=4,
                shared_initial_noise=True,
                rollout_tail_steps=a.tail_steps,
            ),
            "all_but_last": dict(sde_window_size=9),
        }
        runs = interleaved_steps(a10, configs)
        long = runs["all_but_last"]
        res["window"] = {
            "sampling_steps": 10,
            "tail_steps": a.tail_steps,
            **{f"{k}_s": r["step_s"] for k, r in runs.items()},
            **{f"speedup_{k}": long["step_s"] / r["step_s"] for k, r in runs.items() if k != "all_but_last"},
            **{
                f"train_speedup_{k}": long["phases_s"]["train"] / r["phases_s"]["train"]
                for k, r in runs.items()
                if k != "all_but_last"
            },
            "phases_s": {k: r["phases_s"] for k, r in runs.items()},
            # each setting alone in a fresh process (the interleaved run holds all four trainers at once)
            "memory": {
                k: probe(a, argv + ["--sampling_steps", "10"], ov, steps=a.probe_steps)["memory"]
                for k, ov in configs.items()
            },
        }
        for k, r in runs.items():
            if "cuda_peak_allocated_mb" in r:
                res["window"]["memory"][k]["cuda_peak_allocated_mb_interleaved"] = r["cuda_peak_allocated_mb"]
    if "ttr" not in a.skip:
        res["ttr"] = time_to_reward(a, build_trainer)
    if "memory" not in a.skip:
        res["memory_backward"] = memory_compare(a, argv)
    print(json.dumps(res, indent=2, default=str) if a.json else _fmt_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
