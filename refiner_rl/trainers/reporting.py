"""What a run reports while it trains: the console log line, the W&B run (under ``output_dir``, continued on
resume) and PNG sample grids under ``output_dir/samples/``."""

from __future__ import annotations

import logging
import os
import uuid

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from refiner_rl.reporting import reports_to_wandb, save_grid, setup_wandb_env

__all__ = ["SampleGrids", "reports_to_wandb", "save_grid", "setup_wandb_env", "start_wandb_run", "use_console_log"]

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"  # in output_dir: the W&B run a resume continues
SAMPLES_DIR = "samples"


def format_logs(logs: dict, state) -> str:
    """``step 10/300 | loss 0.1234 | grad_norm 0.5 | ...``: numbers as numbers, 4 significant digits."""
    parts = [f"step {state.global_step}/{state.max_steps}"]
    for k, v in logs.items():
        if k == "total_flos":
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


class ConsoleProgress(ProgressCallback):
    """transformers' progress bar, whose log lines print numbers instead of quoted strings."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(format_logs(logs or {}, state))


class ConsolePrinter(PrinterCallback):
    """transformers' printer (``disable_tqdm``), whose log lines print numbers instead of quoted strings."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(format_logs(logs, state), flush=True)


def use_console_log(trainer) -> None:
    """Swap the trainer's progress / printer callback for the ones above."""
    for old, new in ((ProgressCallback, ConsoleProgress), (PrinterCallback, ConsolePrinter)):
        cb = trainer.pop_callback(old)
        if cb is not None:
            trainer.add_callback(new(**({"max_str_len": cb.max_str_len} if hasattr(cb, "max_str_len") else {})))


def start_wandb_run(args, resuming: bool, main: bool) -> None:
    """Open the W&B run before transformers' ``WandbCallback`` would (it then logs into this one): its files go
    to ``output_dir/wandb``; a resumed run continues the W&B run id stored in ``output_dir/wandb_run_id``, a new
    run stores a new id. Main process only; nothing when W&B is not a logger or a run is already open."""
    if not reports_to_wandb(args.report_to) or not main:
        return
    import wandb

    if wandb.run is not None:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    id_file = os.path.join(args.output_dir, WANDB_ID_FILE)
    run_id = None
    if resuming and os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip() or None
    run_id = run_id or uuid.uuid4().hex[:8]
    with open(id_file, "w") as f:
        f.write(run_id + "\n")
    wandb.init(
        project=os.getenv("WANDB_PROJECT", "refiner-rl"),
        dir=os.path.abspath(args.output_dir),
        id=run_id,
        resume="allow",
        name=args.run_name,
    )


class SampleGrids(TrainerCallback):
    """Every ``args.sample_steps`` optimizer steps: ``trainer.sample_grid_rows()`` (every process takes part, so
    sharded weights work) -> ``output_dir/samples/step-N.png`` and, with W&B, the same image as ``samples/grid``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        every = int(getattr(args, "sample_steps", 0) or 0)
        if every <= 0 or state.global_step % every:
            return
        rows = self.trainer.sample_grid_rows()
        if not rows or not args.should_save:
            return
        folder = os.path.join(args.output_dir, SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{state.global_step:06d}.png")
        save_grid(path, rows)
        if reports_to_wandb(args.report_to):
            import wandb

            if wandb.run is not None:
                wandb.log({"samples/grid": wandb.Image(path), "train/global_step": state.global_step}, commit=False)
