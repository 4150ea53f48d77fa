"""Which settings make the tiny editor use a reference that does not line up with the draft (issue 12).

Each preset trains the embedded default's SFT stage (``recipes/tiny/sft.yaml`` plus the preset's overrides: the
training geometry mix or a curriculum, steps, learning rate, batch, ``mask_weight``, shift range, RoPE positions
of the reference, the tiny editor's shape) with the project's own :class:`FlowSFTTrainer`, then (``--grpo_steps``
> 0) the GRPO stage (``recipes/tiny/grpo.yaml`` with a LoRA on the SFT transformer, trained on the preset's last
geometry mix). Every preset is measured on the same held-out sets as the demo: 32 triplets per geometry, aligned,
shifted (pans by whole 4 px tokens, up to 1/4 of the side) and zoomed (1.5-2x), whatever it trained on. Figures are
the in-mask MSE of held-out samples over the draft's (``mse_in_ratio``): after SFT (noise start, 10 ODE steps, the
demo's "after SFT" row), SFT with GRPO's sampler (draft noised to sigma 0.6, pasted back) and after GRPO (same).

    python bench/unaligned_sweep.py --device cuda --out results.json --jobs 4          # every preset
    python bench/unaligned_sweep.py --device cpu --out /tmp/s.json --presets mix,curriculum --steps 2 \
        --grpo_steps 1 --eval_records 4                                                 # a smoke test

A curriculum is a list of ``(geometry mix, fraction of the SFT steps)`` phases, run with the project's own
``synthetic_curriculum`` (the records split between the phases, one optimizer and learning-rate schedule).
With ``--jobs N`` the presets run in N child processes (a tiny editor leaves most of a GPU idle); results are
printed and written to ``--out`` as each preset finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

MIX = "aligned=1,shifted=2,zoomed=2"
UNALIGNED = "shifted=1,zoomed=1"
CURRICULUM = [("aligned", 0.25), ("aligned=1,shifted=2", 0.25), (MIX, 0.5)]
# preset -> overrides. Keys: train (geometry mix or curriculum list), steps, lr, batch, mask_weight, shift_fraction
# (training only), reference_positions, tiny (TinySpec overrides), degrade, grpo (False: SFT only). Unset keys keep
# the recipe's values.
PRESETS: dict[str, dict] = {  # in the order they start
    "mix": dict(train=MIX),
    "curriculum": dict(train=CURRICULUM),
    "combo": dict(train=CURRICULUM, lr=2e-3, mask_weight=16.0, reference_positions="none"),
    "mix_refpos_none": dict(train=MIX, reference_positions="none"),
    "mix_mw16": dict(train=MIX, mask_weight=16.0, grpo=False),
    "mix_lr2e-3": dict(train=MIX, lr=2e-3, grpo=False),
    "unaligned_only": dict(train=UNALIGNED),
    "mix_refpos_beside": dict(train=MIX, reference_positions="beside", grpo=False),
    "mix_shift1tok": dict(train=MIX, shift_fraction=0.125, grpo=False),
    "mix_bs32_half": dict(train=MIX, batch=32, steps_scale=0.5, grpo=False),
    "mix_3+3": dict(train=MIX, tiny={"num_layers": 3, "num_single_layers": 3}, grpo=False),
    "mix_8heads": dict(
        train=MIX,
        tiny={"num_attention_heads": 8, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6]},
        grpo=False,
    ),
}
GEOMETRIES = ("aligned", "shifted", "zoomed")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(name: str) -> str:
    """A recipe of this checkout."""
    return os.path.join(ROOT, "recipes", name)


def _use_checkout() -> None:
    """Import the project from this checkout when it is not installed: the repository root on ``sys.path`` and its
    ``rewards/`` folder as ``refiner_rl.rewards`` (what the install's package-dir mapping does)."""
    import importlib.util

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import refiner_rl.rewards  # noqa: F401
    except ModuleNotFoundError:
        init = os.path.join(ROOT, "rewards", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "refiner_rl.rewards", init, submodule_search_locations=[os.path.dirname(init)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["refiner_rl.rewards"] = module
        spec.loader.exec_module(module)


def _phases(train) -> list[tuple[str, float]]:
    return [(train, 1.0)] if isinstance(train, str) else [(g, float(f)) for g, f in train]


def _model_flags(p: dict) -> list[str]:
    flags = ["--torch_dtype", "float32"]
    if p.get("tiny"):
        flags += ["--tiny_model", json.dumps(p["tiny"])]
    if p.get("reference_positions"):
        flags += ["--reference_positions", p["reference_positions"]]
    return flags


def run_preset(name: str, p: dict, args, result: dict) -> dict:
    """Train one preset and evaluate it, filling ``result`` as it goes ({stage: {geometry: mse_in_ratio}} plus
    steps and timings), so a later failure keeps what was measured. Near ``args.deadline_at`` SFT stops early
    (``sft_steps`` says where) and GRPO is skipped or cut short (``grpo_steps_done``)."""
    import dataclasses

    import torch
    from transformers import TrainerCallback

    _use_checkout()

    from refiner_rl.cli.train import parse_recipe
    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
    from refiner_rl.evaluation import SamplerSettings, evaluate
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer
    from refiner_rl.trainers.base import FULL_WEIGHTS_DIR

    torch.manual_seed(0)
    dev = args.device
    out = tempfile.mkdtemp(prefix=f"unaligned-{name}-")
    steps = max(1, round(args.steps * p.get("steps_scale", 1.0)))
    common = ["--report_to", "none", "--use_cpu", str(dev == "cpu").lower(), "--save_strategy", "no"]
    sft_argv = [
        *("--config", _recipe("tiny/sft.yaml"), "--output_dir", out, "--max_steps", str(steps)),
        *("--sample_steps", "0", "--logging_steps", str(max(1, steps // 5)), "--disable_tqdm", "true"),
        *common,
        *_model_flags(p),
        *("--synthetic_records", str(args.records), "--synthetic_eval_records", str(args.eval_records)),
    ]
    for key, flag in (
        ("lr", "--learning_rate"),
        ("batch", "--per_device_train_batch_size"),
        ("mask_weight", "--mask_weight"),
    ):
        if key in p:
            sft_argv += [flag, str(p[key])]
    if "degrade" in p:
        sft_argv += ["--synthetic_degrade", p["degrade"]]
    model_args, data_args, cfg = parse_recipe((ModelArguments, DataArguments, FlowSFTConfig), sft_argv)
    policy = build_policy(model_args, dev)
    multiple = policy.codec.downsample * 2
    held_out = {  # the demo's held-out sets, whatever the preset trains on
        g: dataclasses.replace(data_args, synthetic_geometry=g).build(multiple=multiple, eval=True) for g in GEOMETRIES
    }
    train_data = dataclasses.replace(data_args, synthetic_shift_fraction=p.get("shift_fraction", 0.25))
    phases = _phases(p["train"])
    if len(phases) == 1:
        train = dataclasses.replace(train_data, synthetic_geometry=phases[0][0]).build(multiple=multiple)
    else:  # the project's curriculum (DataArguments.synthetic_curriculum, FlowSFTTrainer's CurriculumSampler)
        train = dataclasses.replace(train_data, synthetic_curriculum=dict(phases)).build(multiple=multiple)
    at: dict[int, dict] = {}

    deadline = args.deadline_at or float("inf")

    class EvalAt(TrainerCallback):
        """Evaluates (noise start) at the steps of ``--eval_at``; stops training near the deadline."""

        def __init__(self, model, stop_at: float):
            self.model, self.stop_at = model, stop_at

        def on_step_end(self, a, state, control, **kw):
            if self.model is policy and state.global_step in args.eval_at and state.global_step < steps:
                at[state.global_step] = ratios(policy)
                policy.transformer.train()
            if time.time() > self.stop_at:
                control.should_training_stop = True

    def ratios(pol, **sampler) -> dict:
        pol.transformer.eval()
        settings = SamplerSettings(num_steps=args.eval_steps, **sampler)
        return {g: round(evaluate(pol, ds, settings)["mse_in_ratio"], 4) for g, ds in held_out.items()}

    t0 = time.time()
    result.update(sft_steps=0, sft_s=0.0, sft_at=at)
    trainer = FlowSFTTrainer(policy, args=cfg, train_dataset=train, callbacks=[EvalAt(policy, deadline - 60)])
    trainer.train()
    result.update(sft_steps=trainer.state.global_step, sft_s=round(time.time() - t0, 1))
    result["sft"] = ratios(policy)
    if args.grpo_steps > 0 and p.get("grpo", True) and time.time() < deadline - 50:
        from refiner_rl.trainers.grpo_config import FlowGRPOConfig
        from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer

        trainer.save_model(out)
        grpo_argv = [
            *("--config", _recipe("tiny/grpo.yaml"), "--output_dir", os.path.join(out, "grpo")),
            *("--transformer_path", os.path.join(out, FULL_WEIGHTS_DIR), "--max_steps", str(args.grpo_steps)),
            *("--logging_steps", str(max(1, args.grpo_steps // 5)), "--disable_tqdm", "true"),
            *("--synthetic_geometry", phases[-1][0], "--synthetic_eval_records", str(args.eval_records)),
            *("--bf16", "false"),  # fp32 like SFT (bf16 autocast rollouts gave NaN images on an H200, 2026-11-26)
            *common,
            *_model_flags(p),
        ]
        if "degrade" in p:
            grpo_argv += ["--synthetic_degrade", p["degrade"]]
        g_model, g_data, g_cfg = parse_recipe((ModelArguments, DataArguments, FlowGRPOConfig), grpo_argv)
        g_policy = build_policy(g_model, dev)
        g_trainer = FlowGRPOTrainer(
            g_policy,
            args=g_cfg,
            train_dataset=g_data.build(multiple=multiple),
            callbacks=[EvalAt(g_policy, deadline - 25)],
        )
        s = g_trainer.sampler_settings()
        sampler = {"start_sigma": s.start_sigma, "paste": s.paste, "seed": s.seed}
        result["sft_grpo_sampler"] = ratios(g_policy, **sampler)
        t1 = time.time()
        g_trainer.train()
        result.update(grpo_s=round(time.time() - t1, 1), grpo_steps_done=g_trainer.state.global_step)
        result["grpo"] = ratios(g_policy, **sampler)
    return result


def _row(name: str, r: dict) -> str:
    if "error" in r and "sft" not in r:
        return f"{name:<20} ERROR {r['error'][-300:]}"
    cells = []
    for stage in ("sft", "sft_grpo_sampler", "grpo"):
        if stage in r:
            cells.append(" ".join(f"{r[stage][g]:5.2f}" for g in GEOMETRIES))
    at = "".join(f"  @{k}: " + " ".join(f"{v[g]:.2f}" for g in GEOMETRIES) for k, v in r.get("sft_at", {}).items())
    err = f"  ERROR {r['error'][-300:]}" if "error" in r else ""
    grpo = f"  (GRPO {r['grpo_steps_done']} steps)" if "grpo_steps_done" in r else ""
    return f"{name:<20} {r['sft_steps']:>5} {r['sft_s']:>6.0f}s  " + "  |  ".join(cells) + at + grpo + err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="unaligned_sweep.json")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma list of {', '.join(PRESETS)}")
    ap.add_argument("--steps", type=int, default=600, help="SFT steps (a preset may scale them)")
    ap.add_argument("--grpo_steps", type=int, default=60, help="GRPO steps after SFT (0: SFT only)")
    ap.add_argument("--records", type=int, default=1024, help="synthetic training records (a curriculum splits them)")
    ap.add_argument("--eval_records", type=int, default=32)
    ap.add_argument("--eval_steps", type=int, default=10)
    ap.add_argument("--eval_at", default="300", help="comma list of SFT steps to evaluate at too (noise start)")
    ap.add_argument("--jobs", type=int, default=1, help="presets run at once, each in its own process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per preset process")
    ap.add_argument("--start_by_s", type=float, default=None, help="skip presets not started this many seconds in")
    ap.add_argument(
        "--deadline_s",
        type=float,
        default=None,
        help="wrap up this many seconds in: SFT stops 60 s before (rows say the steps done), GRPO starts only "
        "50 s before and stops 25 s before",
    )
    ap.add_argument("--deadline_at", type=float, default=None, help=argparse.SUPPRESS)  # children: absolute time
    args = ap.parse_args(argv)
    args.eval_at = {int(v) for v in args.eval_at.split(",") if v}
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.deadline_s is not None and args.deadline_at is None:
        args.deadline_at = time.time() + args.deadline_s
    results: dict[str, dict] = {}
    print(f"{'preset':<20} {'steps':>5} {'time':>7}  in-mask MSE / draft's: SFT a s z  |  SFT, GRPO sampler  |  GRPO")
    t0 = time.time()

    def one(name: str) -> dict:
        if args.start_by_s is not None and time.time() - t0 > args.start_by_s:
            return {"error": f"skipped: not started within {args.start_by_s:g} s", "sft_steps": 0, "sft_s": 0}
        if args.jobs <= 1:
            import torch

            torch.set_num_threads(args.threads)
            result: dict = {"sft_steps": 0, "sft_s": 0}
            try:
                return run_preset(name, PRESETS[name], args, result)
            except Exception:  # a failing stage keeps what was measured; the other presets go on
                import traceback

                return {**result, "error": traceback.format_exc()[-1500:]}
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        child = [sys.executable, __file__, *argv_passthrough(args), "--presets", name, "--jobs", "1", "--out", path]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(child, env=env, capture_output=True, text=True)
        try:
            with open(path) as f:
                return json.load(f)[name]
        except (OSError, ValueError, KeyError):
            return {"error": (proc.stderr or proc.stdout)[-2000:], "sft_steps": 0, "sft_s": 0}

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(one, name): name for name in names}
        for fut in as_completed(futures):
            name, r = futures[fut], fut.result()
            results[name] = r
            print(_row(name, r), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"total {time.time() - t0:.0f} s; results in {args.out}")
    return 0


def argv_passthrough(args) -> list[str]:
    keep = ("device", "steps", "grpo_steps", "records", "eval_records", "eval_steps", "threads")
    flags = [x for k in keep for x in (f"--{k}", str(getattr(args, k)))]
    if args.deadline_at is not None:
        flags += ["--deadline_at", repr(args.deadline_at)]
    return [*flags, "--eval_at", ",".join(map(str, sorted(args.eval_at)))]


if __name__ == "__main__":
    sys.exit(main())
