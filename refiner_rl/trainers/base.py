"""What every refiner-rl trainer adds to ``transformers.Trainer`` for a diffusers policy.

transformers' Trainer assumes a ``PreTrainedModel`` (SPEC §6). For a diffusers transformer we:
- enable gradient checkpointing through diffusers' own ``enable_gradient_checkpointing``;
- save the LoRA in the format ``FluxKontextPipeline.load_lora_weights`` reads (or the full transformer
  with ``save_pretrained``) instead of a bare state dict, and load it back on resume;
- write checkpoints atomically: into a hidden temporary folder, renamed once complete, so a crash never
  leaves a half-written ``checkpoint-N`` that a resume would pick up.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

FULL_WEIGHTS_DIR = "transformer"


class PolicyTrainerMixin:
    """Mixed into ``Trainer`` subclasses that train ``self.policy.transformer``."""

    policy = None  # set by the subclass before Trainer.__init__

    def _setup_gradient_checkpointing(self, args) -> None:
        # Trainer would call `model.gradient_checkpointing_enable`, which diffusers models lack.
        if args.gradient_checkpointing:
            self.policy.transformer.enable_gradient_checkpointing()
            args.gradient_checkpointing = False

    # ---------------------------------------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.policy.has_lora:
            if state_dict is not None and not any("lora" in k for k in state_dict):
                state_dict = None  # a gathered dict without adapter keys: read the live module instead
            self.policy.save_lora(output_dir, state_dict=state_dict)
        else:
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(os.path.join(output_dir, FULL_WEIGHTS_DIR), state_dict=state_dict, safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.policy.has_lora:
            self.policy.load_lora(resume_from_checkpoint)
            return
        from diffusers import FluxTransformer2DModel

        folder = os.path.join(resume_from_checkpoint, FULL_WEIGHTS_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint {resume_from_checkpoint!r} has no {FULL_WEIGHTS_DIR}/ folder to resume from")
        loaded = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=self.policy.dtype, use_safetensors=True)
        self.accelerator.unwrap_model(self.model).load_state_dict(loaded.state_dict())

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into ``.tmp-checkpoint-N/`` first, then rename it into place."""
        run_dir = Trainer._get_output_dir(self, trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        tmp_run = os.path.join(run_dir, f".tmp-{name}")
        self._get_output_dir = lambda trial=None: tmp_run  # the parent writes tmp_run/checkpoint-N
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(tmp_run, name), final)
            shutil.rmtree(tmp_run, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)  # fmt: skip
        self.accelerator.wait_for_everyone()


def setup_wandb_env(report_to) -> None:
    """Log to W&B offline when no API key is configured, so a run never blocks on a login prompt."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" in targets or "all" in targets:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            logger.info("no W&B API key found: logging offline (sync later with `wandb sync`)")
