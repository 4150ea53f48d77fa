"""What every refiner-rl trainer adds to ``transformers.Trainer`` for a diffusers policy.

transformers' Trainer assumes a ``PreTrainedModel``. For a diffusers transformer we:
- enable gradient checkpointing through diffusers' own ``enable_gradient_checkpointing``;
- save the LoRA in the format ``FluxKontextPipeline.load_lora_weights`` reads (or the full transformer
  with ``save_pretrained``) instead of a bare state dict, and load it back on resume;
- write checkpoints atomically: into a hidden staging folder, renamed once complete, so a crash never
  leaves a half-written ``checkpoint-N`` that a resume would pick up; resume from ``true``/``latest``,
  ``latest_valid`` or a path, checked first (see ``checkpoints.py``);
- print log lines with numbers, keep W&B under ``output_dir`` (one run id across resumes) and save sample grids
  (see ``reporting.py``);
- under DeepSpeed: fill the ``"auto"`` bucket sizes transformers derives from ``model.config.hidden_size`` (a
  diffusers config has none), and under ZeRO-3 gather the partitioned weights when saving, so the output is the
  same LoRA / diffusers folder a one-process run writes.
"""

from __future__ import annotations

import glob
import logging
import os

import torch
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from refiner_rl.distributed import fill_deepspeed_auto_values, gathered_state_dict, is_zero3
from refiner_rl.errors import CheckpointError, ConfigError
from refiner_rl.trainers.checkpoints import (
    STAGING_PREFIX,
    TRAINER_STATE,
    publish_checkpoint,
    remove_stale_staging,
    resolve_checkpoint,
)
from refiner_rl.trainers.reporting import SampleGrids, setup_wandb_env, start_wandb_run, use_console_log

__all__ = ["FULL_WEIGHTS_DIR", "PolicyTrainerMixin", "save_transformer_state_dict", "setup_wandb_env"]

logger = logging.getLogger(__name__)

FULL_WEIGHTS_DIR = "transformer"


class PolicyTrainerMixin:
    """Mixed into ``Trainer`` subclasses that train ``self.policy.transformer``."""

    policy = None  # set by the subclass before Trainer.__init__

    def __init__(self, policy, args, train_dataset=None, eval_dataset=None, callbacks=None):
        """``Trainer.__init__`` over ``policy.transformer`` with the triplet collator, W&B set up (offline without
        an API key), diffusers' gradient checkpointing, console logs that print numbers, and sample grids."""
        from refiner_rl.data import collate_triplets

        self.policy = policy
        setup_wandb_env(args.report_to)
        self._setup_gradient_checkpointing(args)
        super().__init__(
            model=policy.transformer,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collate_triplets,
            callbacks=callbacks,
        )
        use_console_log(self)
        self.add_callback(SampleGrids(self))

    @staticmethod
    def default_args(model, config_cls, suffix: str):
        """TRL's default when no config is given: ``config_cls(output_dir="<model name>-<suffix>")``."""
        name = model if isinstance(model, str) else "refiner"
        return config_cls(output_dir=f"{name.rstrip('/').split('/')[-1]}-{suffix}")

    # ---------------------------------------------------------------------------------------------- resume
    def _set_rewards(self, reward_funcs, args) -> list:
        """Resolve TRL-style ``reward_funcs`` (one item or a list; ``None`` takes ``args.rewards``) into reward
        objects, and set ``self.rewards``, ``self.reward_names`` and ``self.reward_weights`` (from
        ``args.reward_weights``, default 1 each). ConfigError when there are no rewards or the weights do not match."""
        from refiner_rl.scoring.registry import build_reward_funcs, reward_labels

        if reward_funcs is None:
            if not args.rewards:
                raise ConfigError(
                    "no rewards: give `reward_funcs` to the trainer or a `rewards:` list in the config "
                    "(see `refiner-rl rewards list`)"
                )
            reward_funcs = args.rewards
        rewards = build_reward_funcs(reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ConfigError(f"`reward_weights` has {len(weights)} entries for {len(rewards)} rewards")
        self.rewards, self.reward_names = rewards, reward_labels(rewards)
        self.reward_weights = torch.tensor([float(w) for w in weights])
        return rewards

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train`` with ``resume_from_checkpoint`` = ``True``/``"true"``/``"latest"`` (newest
        ``checkpoint-N`` of ``output_dir``), ``"latest_valid"`` (newest intact one) or a path; the checkpoint is
        checked before anything loads (:class:`CheckpointError` names the broken file and the newest intact
        checkpoint). A resume calls ``self._on_resume(path)`` before training continues."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
            self._on_resume(checkpoint)
        if self.args.should_save:
            remove_stale_staging(self.args.output_dir)
        start_wandb_run(self.args, resuming=checkpoint is not None, main=self.is_world_process_zero())
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _on_resume(self, checkpoint: str) -> None:
        """Called once before training resumes from ``checkpoint`` (a checked folder): restore counters a
        subclass keeps outside Trainer's state. Nothing by default."""

    # ------------------------------------------------------------------------------------------ samples
    def sample_grid_rows(self) -> list[list[torch.Tensor]] | None:
        """Rows of ``[3, H, W]`` images for the sample grid saved every ``sample_steps``. By default the last
        rollout a trainer kept in ``self._last_samples`` (``batch``, ``images``): draft | reference | sample |
        target."""
        s = getattr(self, "_last_samples", None)
        if not s:
            return None
        b, k = s["batch"], min(int(getattr(self.args, "num_log_samples", 4)), s["images"].shape[0])
        return [
            [b["draft"][i], b["reference"][i], s["images"][i]] + ([b["target"][i]] if "target" in b else [])
            for i in range(k)
        ]

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
                raise CheckpointError(
                    f"checkpoint {resume_from_checkpoint!r} has no {FULL_WEIGHTS_DIR}/ folder (it holds a LoRA?): "
                    "resume with the same use_lora setting it was written with"
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
                raise CheckpointError(
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
        """Trainer's checkpoint (weights, optimizer, scheduler, scaler, RNG, trainer state), written into
        ``.tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` once complete: a killed run leaves only the staging
        folder, which a resume never picks up (and the next run deletes)."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                slot = self.state.stateful_callbacks
                if isinstance(slot.get(cb.__class__.__name__), list):
                    slot[cb.__class__.__name__].append(cb.state())
                else:
                    slot[cb.__class__.__name__] = cb.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging, final)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
                if os.path.exists(best):
                    self.state.best_model_checkpoint = best
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
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
