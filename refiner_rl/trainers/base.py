"""What every refiner-rl trainer adds to ``transformers.Trainer`` for a diffusers policy.

transformers' Trainer assumes a ``PreTrainedModel``. For a diffusers transformer we:
- enable gradient checkpointing through diffusers' own ``enable_gradient_checkpointing``;
- save the LoRA in the format the editor's diffusers pipeline reads with ``load_lora_weights`` (or the full transformer
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

import contextlib
import glob
import logging
import os

import torch
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from refiner_rl import model_settings
from refiner_rl.data.records import condition_image
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

__all__ = [
    "EVAL_SEED",
    "FULL_WEIGHTS_DIR",
    "PolicyTrainerMixin",
    "RewardTrainerMixin",
    "save_transformer_state_dict",
    "setup_wandb_env",
]

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
            saved = model_settings.load(checkpoint)  # the run goes on serving the model as it was trained
            model_settings.check_same(saved, self.model_settings(), f"resuming from {checkpoint}")
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
        return [grid_row(b, i, s["images"][i]) for i in range(k)]

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
        model_settings.save(self.model_settings(), output_dir)  # refiner_rl_model.json: edit/eval/resume read it

    def model_settings(self):
        """The :class:`~refiner_rl.model_settings.ModelSettings` saved with every output and checkpoint."""
        return model_settings.of_run(self.policy, self.train_dataset, self.args)

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


def grid_row(batch: dict, i: int, *images: torch.Tensor) -> list[torch.Tensor]:
    """A sample-grid row: draft | reference (or mask) | ``images`` | target (when the batch has one)."""
    return [batch["draft"][i], condition_image(batch, i), *images] + ([batch["target"][i]] if "target" in batch else [])


EVAL_SEED = 1234  # held-out noise: the same draws at every evaluation, so checkpoints compare like with like


class RewardTrainerMixin(PolicyTrainerMixin):
    """What the reward-driven trainers (GRPO and its objectives, ReFL) share, written once: the reference policy,
    the EMA life cycle (kept, saved, restored on resume), logged metrics (per-process means, the W&B sample table),
    the sampler settings and the held-out evaluation.

    A subclass calls :meth:`init_reward_state`, sets ``self.rewards``, ``self.reward_names`` and
    ``self.reward_weights``, appends to ``self._metrics["train"]`` and sets ``self._last_samples`` while training,
    and defines :meth:`evaluation_settings`."""

    evaluate_with_ema = (
        True  # evaluate the EMA weights when the trainer keeps an EMA (GRPO); ReFL's EMA is its reference
    )
    reference_is_ema = False  # the reference policy is the EMA (ReFL's OneReward-Dynamic), not the frozen start
    ema_resume_hint = "resume with the same ema_decay the checkpoint was written with"

    def init_reward_state(self, policy, *, frozen_reference: bool, ema: bool, ema_decay: float) -> None:
        """The reference policy (:meth:`init_reference`), an EMA of the trained weights updated after every optimizer
        step when ``ema`` (else ``self.ema`` is None), and empty metric lists."""
        from collections import defaultdict

        from refiner_rl.trainers.ema import EMA, EMACallback

        self.init_reference(policy, frozen_copy=frozen_reference)
        self.ema = EMA(policy.transformer, ema_decay) if ema else None
        if self.ema is not None:
            self.add_callback(EMACallback(self))
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_samples: dict | None = None

    def init_reference(self, policy, frozen_copy: bool) -> None:
        """``self.ref_transformer``: a frozen copy of the starting transformer when ``frozen_copy`` and the policy has
        no LoRA (with a LoRA, the reference is the same transformer with its adapter switched off: no second copy)."""
        import copy

        from refiner_rl.distributed import frozen_model_context

        self.ref_transformer = None
        if frozen_copy and not policy.has_lora:
            with frozen_model_context():
                self.ref_transformer = copy.deepcopy(policy.transformer).eval().requires_grad_(False)

    @contextlib.contextmanager
    def reference_transformer(self, model):
        """The reference policy's transformer inside the context: ``model`` with the EMA weights swapped in (an EMA
        reference), the frozen copy (full fine-tuning), or ``model`` with its LoRA switched off."""
        if self.reference_is_ema and self.ema is not None:
            with self.ema.applied(self.accelerator.unwrap_model(model)):
                yield model
        elif self.ref_transformer is not None:
            yield self.ref_transformer
        else:
            with self.policy.adapter_disabled(model):
                yield model

    def process_means(self, lists: dict[str, list[float]]) -> dict[str, float]:
        """The mean of each metric's values on this process, averaged over processes as the loss is (every process
        logs the same keys)."""
        metrics = {k: sum(v) / len(v) for k, v in lists.items() if v}
        if metrics and self.accelerator.num_processes > 1:
            keys = sorted(metrics)
            vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            metrics = dict(zip(keys, self.accelerator.reduce(vals, reduction="mean").tolist()))
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log with this mode's collected metrics (:meth:`process_means`; ``eval_``-prefixed in eval
        mode), then, in training, the W&B sample table when ``log_samples``."""
        mode = "train" if self.model.training else "eval"
        metrics = self.process_means(self._metrics[mode])
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self.args.log_samples and self._last_samples is not None:
            if self.accelerator.is_main_process:
                self._log_sample_table()

    def _log_sample_table(self) -> None:
        """The last training batch as a W&B table: draft, reference (or mask), sample, target, total and each reward."""
        targets = [self.args.report_to] if isinstance(self.args.report_to, str) else list(self.args.report_to or [])
        if "wandb" not in targets and "all" not in targets:
            return
        import wandb

        if wandb.run is None:
            return
        s = self._last_samples
        b, k = s["batch"], min(self.args.num_log_samples, s["images"].shape[0])
        cols = ["step", "draft", "reference", "sample", "target", "reward"] + list(self.reward_names)
        table = wandb.Table(columns=cols)

        def img(t):
            return wandb.Image((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8"))

        for i in range(k):
            tgt = img(b["target"][i]) if "target" in b else None
            row = [
                self.state.global_step,
                img(b["draft"][i]),
                img(condition_image(b, i)),
                img(s["images"][i]),
                tgt,
                float(s["total"][i]),
            ]
            table.add_data(*row, *[float(v) for v in s["scores"][i]])
        wandb.log({"samples": table}, commit=False)

    def sampler_settings(self, seed: int = EVAL_SEED):
        """This config's ODE sampler as :class:`~refiner_rl.evaluation.SamplerSettings` (the full schedule, no SDE
        window), drawing record ``i``'s noise from ``(seed, i)``."""
        from refiner_rl.evaluation import SamplerSettings

        a = self.args
        focus = a.focus_settings() if hasattr(a, "focus_settings") else None
        return SamplerSettings(
            num_steps=a.num_inference_steps,
            seed=seed,
            start_sigma=a.start_sigma,
            paste=a.paste_back,
            true_cfg_scale=getattr(a, "true_cfg_scale", 1.0),
            negative_prompt=getattr(a, "negative_prompt", ""),
            focus=focus,
        )

    def evaluation_settings(self) -> dict:
        """Keyword arguments of :func:`refiner_rl.evaluation.evaluate`: :meth:`sampler_settings` with fixed noise
        (``EVAL_SEED``), the eval batch size, the rewards and their weights."""
        return dict(
            sampler=self.sampler_settings(),
            batch_size=self.args.per_device_eval_batch_size,
            rewards=self.rewards,
            reward_weights=self.reward_weights.tolist(),
            reward_names=self.reward_names,
        )

    def _before_evaluation(self, dataset) -> None:
        """Hook: anything :meth:`evaluation_settings` needs from the held-out set (ReFL: the reference's samples)."""

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out metrics (:func:`refiner_rl.evaluation.evaluate` with :meth:`evaluation_settings`), with the EMA
        weights when the trainer keeps an evaluation EMA. Deterministic: the same noise at every call. Keys are
        prefixed ``{metric_key_prefix}_`` and logged."""
        from transformers import Trainer

        from refiner_rl.evaluation import evaluate

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._before_evaluation(ds)
        if ds is None:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        use_ema = self.ema is not None and self.evaluate_with_ema
        ctx = self.ema.applied(model) if use_ema else contextlib.nullcontext()
        was_training = model.training
        with ctx:
            model.eval()
            try:
                res = evaluate(self.policy, ds, **self.evaluation_settings(), transformer=model)
            finally:
                model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in res.items()}
        Trainer.log(self, dict(metrics))  # a copy: Trainer.log adds `epoch` to the dict it logs
        return metrics

    # ------------------------------------------------------------------------------------------ the EMA
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The live weights (base class), plus with an EMA its shadow (``ema_state.safetensors``, for resume) and
        :meth:`_save_ema_weights`. Checkpoints call this inside their temporary folder, so the EMA is part of the
        atomic rename."""
        super()._save(output_dir, state_dict)
        if self.ema is None or not self.args.should_save:
            return
        from refiner_rl.trainers.ema import save_ema_state

        output_dir = output_dir or self.args.output_dir
        save_ema_state(self.ema, output_dir)
        self._save_ema_weights(output_dir, state_dict)

    def _save_ema_weights(self, output_dir: str, state_dict: dict | None) -> None:
        """Hook: the EMA weights in a loadable format (GRPO writes ``ema/``); ReFL's EMA is only its reference."""

    def _load_extra_state(self, checkpoint: str) -> None:
        if self.ema is not None:
            from refiner_rl.trainers.ema import load_ema_checkpoint

            load_ema_checkpoint(self.ema, checkpoint, self.ema_resume_hint)
