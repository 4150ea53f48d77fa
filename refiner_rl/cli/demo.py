"""``refiner-rl demo``: the embedded default, end to end on a CPU.

1. make synthetic triplets with fine detail: training triplets of the recipes' ``synthetic_geometry`` (aligned,
   shifted and zoomed references, each registered to its draft: ``reference_alignment``) and one held-out set per
   reference geometry (aligned, shifted, zoomed);
2. check the codec reconstructs them (PSNR);
3. SFT the tiny editor (``recipes/tiny/sft.yaml``), write its checkpoint, log to W&B (offline without an
   API key);
4. GRPO with a LoRA on the SFT transformer (``recipes/tiny/grpo.yaml``) unless ``--skip-grpo``;
5. write a PNG grid draft | reference | output | target and print a before/after table per reference geometry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from importlib import resources

import torch


def recipe_path(name: str) -> str:
    """Path of a shipped recipe (``recipes/`` is installed as ``refiner_rl.recipes``)."""
    return str(resources.files("refiner_rl.recipes").joinpath(name))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


GEOMETRIES = ("aligned", "shifted", "zoomed")  # one held-out set each


def _evaluate_each(evaluate, policy, held_out: dict, **settings) -> dict:
    """``evaluate`` on every held-out set: {geometry: metrics}."""
    return {g: evaluate(policy, ds, **settings) for g, ds in held_out.items()}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="refiner-rl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--output_dir", default="outputs/demo", help="where checkpoints, logs, the grid and the report go")
    ap.add_argument("--sft_steps", type=int, default=None, help="override the SFT recipe's max_steps")
    ap.add_argument("--grpo_steps", type=int, default=None, help="override the GRPO recipe's max_steps")
    ap.add_argument("--skip-grpo", action="store_true", help="run only the SFT stage")
    ap.add_argument("--eval_steps", type=int, default=10, help="ODE sampling steps for held-out evaluation")
    args = ap.parse_args(argv)

    from refiner_rl.cli.train import _setup_logging, parse_recipe
    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
    from refiner_rl.data import collate_triplets, write_records
    from refiner_rl.evaluation import SamplerSettings, evaluate
    from refiner_rl.sampling import sample_images
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer

    _setup_logging()
    t0 = time.time()
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    report: dict = {}

    # 1-3. SFT on synthetic triplets
    sft_argv = ["--config", recipe_path("tiny/sft.yaml"), "--output_dir", os.path.join(out, "sft")]
    if args.sft_steps is not None:
        sft_argv += ["--max_steps", str(args.sft_steps)]
    model_args, data_args, sft_cfg = parse_recipe((ModelArguments, DataArguments, FlowSFTConfig), sft_argv)
    policy = build_policy(model_args, "cpu")
    multiple = policy.size_multiple
    train = data_args.build(multiple=multiple)
    held_out_args = {g: dataclasses.replace(data_args, synthetic_geometry=g) for g in GEOMETRIES}
    held_out = {g: a.build(multiple=multiple, eval=True) for g, a in held_out_args.items()}
    # the held-out records as files, for `refiner-rl refine` / `eval` on the trained models
    held_out_files = {
        g: write_records(os.path.join(out, "held_out", g), a.records(eval=True)[0]) for g, a in held_out_args.items()
    }
    shown = [held_out[g][i] for g in GEOMETRIES[1:] for i in range(4)]  # grid: 4 shifted and 4 zoomed references
    sample = collate_triplets(shown)
    # the two sets number their records alike; samplers encode one condition per distinct index
    sample["index"] = torch.arange(len(shown))
    recon = policy.codec.decode(policy.codec.encode(sample["target"]))
    report["codec_psnr_db"] = psnr(recon, sample["target"])
    print(
        f"\n[demo] {len(train)} training triplets ({data_args.synthetic_geometry} references) and "
        f"{' + '.join(str(len(d)) for d in held_out.values())} held-out ones ({', '.join(held_out)}); codec "
        f"{type(policy.codec).__name__} reconstructs them at PSNR {report['codec_psnr_db']:.1f} dB\n"
    )

    policy.transformer.eval()
    ode = SamplerSettings(num_steps=args.eval_steps)
    before = _evaluate_each(evaluate, policy, held_out, sampler=ode)
    trainer = FlowSFTTrainer(policy, args=sft_cfg, train_dataset=train)
    trainer.train()
    trainer.save_model(sft_cfg.output_dir)
    trainer.save_state()
    policy.transformer.eval()
    after_sft = _evaluate_each(evaluate, policy, held_out, sampler=ode)
    after_sft_paste = _evaluate_each(evaluate, policy, held_out, sampler=dataclasses.replace(ode, paste=True))
    report.update(
        sft_seconds=round(time.time() - t0, 1), before=before, after_sft=after_sft, after_sft_paste_back=after_sft_paste
    )
    rows = [
        ("random init", before),
        ("draft (input)", {g: _draft_row(r) for g, r in before.items()}),
        ("after SFT", after_sft),
        ("after SFT + paste-back", after_sft_paste),
    ]
    images = {"sft": sample_images(policy, sample, num_steps=args.eval_steps, seed=0)}
    _finish_wandb_run()  # each stage gets its own W&B run

    # 4. GRPO from the SFT LoRA
    if not args.skip_grpo:
        from refiner_rl.trainers.grpo_config import FlowGRPOConfig
        from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer

        grpo_argv = [
            "--config",
            recipe_path("tiny/grpo.yaml"),
            "--output_dir",
            os.path.join(out, "grpo"),
            *_sft_weights_args(model_args, sft_cfg.output_dir),
        ]
        if args.grpo_steps is not None:
            grpo_argv += ["--max_steps", str(args.grpo_steps)]
        g_model, g_data, g_cfg = parse_recipe((ModelArguments, DataArguments, FlowGRPOConfig), grpo_argv)
        g_policy = build_policy(g_model, "cpu")
        g_train = g_data.build(multiple=multiple)
        print(f"\n[demo] GRPO on {len(g_train)} training triplets ({g_data.synthetic_geometry} references)\n")
        g_trainer = FlowGRPOTrainer(g_policy, args=g_cfg, train_dataset=g_train, eval_dataset=held_out["shifted"])
        # GRPO's sampler (start sigma, paste-back, CFG) and rewards: one evaluation gives the MSE row and the reward
        settings = g_trainer.evaluation_settings()
        settings["sampler"] = dataclasses.replace(settings["sampler"], num_steps=args.eval_steps)
        g_policy.transformer.eval()
        sft_same = _evaluate_each(evaluate, g_policy, held_out, **settings)
        rows.append((f"SFT, GRPO's sampler (start {g_cfg.start_sigma:g})", sft_same))
        g_trainer.train()
        g_trainer.save_model(g_cfg.output_dir)
        g_trainer.save_state()
        _save_evaluated_sampler(g_cfg.output_dir, settings["sampler"])
        g_policy.transformer.eval()
        after_grpo = _evaluate_each(evaluate, g_policy, held_out, **settings)
        rows.append((f"after GRPO (start {g_cfg.start_sigma:g})", after_grpo))
        report.update(
            after_grpo=after_grpo,
            sft_with_grpo_sampler=sft_same,
            held_out_reward_sft={g: _reward_part(r) for g, r in sft_same.items()},
            held_out_reward_grpo={g: _reward_part(r) for g, r in after_grpo.items()},
        )
        images["grpo"] = sample_images(
            g_policy,
            sample,
            num_steps=args.eval_steps,
            seed=0,
            start_sigma=g_cfg.start_sigma,
            paste=g_cfg.paste_back,
            true_cfg_scale=g_cfg.true_cfg_scale,
            negative_prompt=g_cfg.negative_prompt,
        )

        _finish_wandb_run()

    # 5. grid + report
    grid_rows = [
        [sample["draft"][i], sample["reference"][i], *[images[k][i] for k in images], sample["target"][i]]
        for i in range(sample["draft"].shape[0])
    ]
    grid_path = os.path.join(out, "samples.png")
    from refiner_rl.reporting import save_grid

    save_grid(grid_path, grid_rows)
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n[demo] held-out triplets per reference geometry (MSE against the target, [0, 1] pixels):")
    from refiner_rl.evaluation import before_after_table  # the eval command's table code

    for g in held_out:
        print(f"\n{g} references:\n" + before_after_table([(label, by_geometry[g]) for label, by_geometry in rows]))
    if "held_out_reward_grpo" in report:
        for g in held_out:
            a, b = report["held_out_reward_sft"][g]["reward"], report["held_out_reward_grpo"][g]["reward"]
            print(f"[demo] held-out composite reward, {g} references: SFT {a:.5f} -> GRPO {b:.5f} ({_rel(a, b):+.1%})")
    print(f"\n[demo] grid (draft | reference | {' | '.join(images)} | target): {grid_path}")
    print(f"[demo] checkpoints: {sft_cfg.output_dir}" + ("" if args.skip_grpo else f", {os.path.join(out, 'grpo')}"))
    if not args.skip_grpo:
        refined = os.path.join(out, "refined", "shifted")
        print(
            f"[demo] apply the GRPO refiner as it was trained and evaluated (the table's 'after GRPO' in-mask MSE): "
            f"refiner-rl refine --model {os.path.join(out, 'grpo')} --records {held_out_files['shifted']} "
            f"--output_dir {refined}"
        )
    print(f"[demo] report: {os.path.join(out, 'report.json')}; total {report['seconds']:.0f} s")
    return 0


def _save_evaluated_sampler(folder: str, sampler) -> None:
    """Record in ``folder``'s model settings the sampler its table rows were measured with (steps and noise seed;
    the trainer saved its own), so ``refiner-rl refine`` of the held-out files reproduces them with no flag."""
    from refiner_rl import model_settings

    settings = model_settings.load(folder)
    settings.sampler.update(num_inference_steps=sampler.num_steps, seed=sampler.seed)
    model_settings.save(settings, folder)


def _sft_weights_args(model_args, sft_dir: str) -> list[str]:
    """GRPO flags that start from the SFT stage's output: its transformer (full fine-tuning) or its LoRA."""
    from refiner_rl.trainers.base import FULL_WEIGHTS_DIR

    if model_args.use_lora:
        return ["--init_lora_path", sft_dir, "--transformer_path", ""]
    return ["--transformer_path", os.path.join(sft_dir, FULL_WEIGHTS_DIR)]


def _finish_wandb_run() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _draft_row(r: dict) -> dict:
    return {"mse_output_in": r["mse_draft_in"], "mse_output_out": r["mse_draft_out"], "mse_in_ratio": 1.0}


def _reward_part(r: dict) -> dict:
    """The reward metrics of an evaluation (``reward``, ``reward_failed_frac``, ``rewards/<name>/...``)."""
    return {k: v for k, v in r.items() if k.startswith("reward")}


def _rel(a: float, b: float) -> float:
    """Relative improvement of a reward that may be negative: (b - a) / |a|."""
    return (b - a) / max(abs(a), 1e-12)
