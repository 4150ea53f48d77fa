"""What every refiner-rl trainer adds to ``transformers.Trainer`` for a diffusers policy.

transformers' Trainer assumes a ``PreTrainedModel`` (SPEC §6). For a diffusers transformer we:
- enable gradient checkpointing through diffusers' own ``enable_gradient_checkpointing``;
- save the LoRA in the format ``FluxKontextPipeline.load_lora_weights`` reads (or the full transformer
  with ``save_pretrained``) instead of a bare state dict, and load it back on resume;
- write checkpoints atomically: into a hidden temporary folder, renamed once complete, so a crash never
  leaves a half-written ``checkpoint-N`` that a resume would pick up;
- under DeepSpeed: fill the ``"auto"`` bucket sizes transformers derives from ``model.config.hidden_size`` (a
  diffusers config has none), and under ZeRO-3 gather the partitioned weights when saving, so the output is the
  same LoRA / diffusers folder a one-process run writes.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from refiner_rl.distributed import fill_deepspeed_auto_values, gathered_state_dict, is_zero3

logger = logging.getLogger(__name__)

FULL_WEIGHTS_DIR = "transformer"


class PolicyTrainerMixin:
    """Mixed into ``Trainer`` subclasses that train ``self.policy.transformer``."""

    policy = None  # set by the subclass before Trainer.__init__

    def _setup_gradient_checkpointing(self, args) -> None:
        # Trainer would call `model.activation_checkpointing_enable` / `gradient_checkpointing_enable`, which
        # diffusers models lack; transformers 5 reads `activation_checkpointing` (gradient_* is its alias).
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            self.policy.transformer.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False

    # ------------------------------------------------------------------------------------------- DeepSpeed
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_deepspeed_enabled:
            # transformers would raise at train() on "auto" bucket sizes: a diffusers config has no hidden_size.
            fill_deepspeed_auto_values(self.accelerator.state.deepspeed_plugin.hf_ds_config, self.policy.transformer)

    def _zero3_engine(self):
        """The DeepSpeed engine when the weights are ZeRO-3 partitioned (after train() started), else None."""
        engine = getattr(self, "deepspeed", None)
        return engine if engine is not None and is_zero3(self) else None

    # ---------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        engine = self._zero3_engine()
        if engine is None:
            return super().save_model(output_dir, _internal_call)
        # ZeRO-3: every rank takes part in gathering (only the adapter for LoRA), rank 0 writes the same folder a
        # one-process run writes. Works whether or not the config sets stage3_gather_16bit_weights_on_model_save.
        module = self.accelerator.unwrap_model(self.model)
        state_dict = gathered_state_dict(engine, module, trainable_only=self.policy.has_lora)
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.policy.has_lora:
            if state_dict is not None and not any("lora" in k for k in state_dict):
                if self._zero3_engine() is not None:
                    raise RuntimeError(
                        "ZeRO-3 save: the gathered state dict has no LoRA keys; refusing to write partitioned weights"
                    )
                state_dict = None  # a gathered dict without adapter keys: read the live module instead
            self.policy.save_lora(output_dir, state_dict=state_dict)
        else:
            model = self.accelerator.unwrap_model(self.model)
            folder = os.path.join(output_dir, FULL_WEIGHTS_DIR)
            if state_dict:
                save_transformer_state_dict(model, folder, state_dict)
            elif self._zero3_engine() is not None:
                raise RuntimeError("ZeRO-3 save: no gathered weights; refusing to write partitioned weights")
            else:
                model.save_pretrained(folder, safe_serialization=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.policy.has_lora:
            self.policy.load_lora(resume_from_checkpoint)
        else:
            folder = os.path.join(resume_from_checkpoint, FULL_WEIGHTS_DIR)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"checkpoint {resume_from_checkpoint!r} has no {FULL_WEIGHTS_DIR}/ folder to resume from"
                )
            self.policy.load_transformer(folder)  # the trained model is the policy's transformer (unwrapped)
        self._load_extra_state(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if (
            checkpoint is not None
            and not self.is_deepspeed_enabled
            and not os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
        ):
            if glob.glob(os.path.join(checkpoint, "global_step*")):
                # transformers would silently start a fresh optimizer (measured: the weights then drift by ~1e-3
                # from the uninterrupted run within one step).
                raise ValueError(
                    f"{checkpoint!r} was written under DeepSpeed (its optimizer state is in global_step*/): resume it with "
                    "the same DeepSpeed launcher config, or start a new run from its weights (--init_lora_path CHECKPOINT for LoRA, "
                    "--transformer_path CHECKPOINT/transformer for full fine-tuning)"
                )
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            # Under DeepSpeed, Trainer restores weights and optimizer from DeepSpeed's own files (global_step*/)
            # and never calls _load_from_checkpoint: the trainer's extra state is restored here instead.
            self._load_extra_state(checkpoint)

    def _load_extra_state(self, checkpoint: str) -> None:
        """State a subclass keeps beyond weights, optimizer, scheduler and RNG (e.g. GRPO's EMA); called once on
        resume with any launcher."""

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

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def save_transformer_state_dict(model, folder: str, state_dict: dict) -> None:
    """Write ``state_dict`` (e.g. gathered from ZeRO-3 shards) in the layout ``model.save_pretrained`` writes:
    ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (sharded at 10 GB with an index, as diffusers)."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_torch_state_dict(
        state_dict,
        folder,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size="10GB",
        metadata={"format": "pt"},
    )


def setup_wandb_env(report_to) -> None:
    """Log to W&B offline when no API key is configured, so a run never blocks on a login prompt."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" in targets or "all" in targets:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            logger.info("no W&B API key found: logging offline (sync later with `wandb sync`)")
