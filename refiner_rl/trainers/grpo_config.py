"""Configuration of the GRPO stage: TRL's ``GRPOConfig`` vocabulary plus the flow-matching knobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import GRPOConfig

from refiner_rl.distributed import prepare_cpu_distributed
from refiner_rl.dynamics import STEP_RULES, WINDOW_MODES

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class FlowGRPOConfig(GRPOConfig):
    """GRPO for flow-matching editors. TRL's names keep TRL's meanings:

    Groups and batches (TRL semantics, derived and checked in ``__post_init__``):
        num_generations: samples per condition (draft + reference + instruction).
        per_device_train_batch_size: samples per micro-step per process.
        steps_per_generation / generation_batch_size: one rollout feeds this many micro-steps / samples.
        num_iterations: updates per rollout (mu in the GRPO paper).
    Objective:
        beta: KL coefficient against the reference (the same transformer with LoRA disabled; a frozen copy
            for full fine-tuning). KL is the exact Gaussian KL of the two step distributions, which share
            their std: ``mean((mu - mu_ref)^2) / (2 std^2)`` (Flow-GRPO divides by ``2 g^2`` instead).
        epsilon, epsilon_high: clip range of the importance ratio. Log-probs are means over latent dims, so
            ratios move little: 1e-3 here, 1e-4 in Flow-GRPO. The clip only acts on updates after the first of
            a rollout (``num_iterations`` > 1, or ``steps_per_generation`` > ``gradient_accumulation_steps``):
            before it the ratio is 1 (tested). Measured on the tiny task, second update of each rollout: LoRA
            rank 16 at lr 1e-3 moves ratios by ~3e-6 (nothing clipped); full fine-tuning at lr 3e-3 moves them
            by ~2e-3 and 1e-3 clips 69% of the samples (49% of the tokens with per-token ratios, 8% at 1e-2).
            1e-3 is kept: at LoRA learning rates it never binds, and where it binds the step is large enough
            that a trust region is what is wanted; raise it (1e-2) for full fine-tuning with rollout reuse.
        scale_rewards (group | batch | none), multi_objective_aggregation (sum_then_normalize |
            normalize_then_sum), reward_weights: as in TRL. adv_clip_max clips advantages.
        loss_type: accepted for compatibility; every image has the same number of latent dims, so grpo,
            bnpo, dr_grpo and dapo reduce to the same mean.
    Sampling:
        num_inference_steps, sde_type (flow_sde | cps | dance | ode), noise_level, sde_window_* (which steps
            are stochastic and trained; the rest are ODE under no_grad), true_cfg_scale, start_sigma (start from
            the draft noised to this sigma instead of pure noise), paste_back (keep the draft outside the mask).
        shared_initial_noise: the samples of a group start from one noise (keyed by the record) and differ only
            by the noise of the trained SDE steps, so the group baseline compares like with like (a per-start
            baseline; the gradient estimate stays unbiased). The ODE steps before the window then run once per
            group. Measured on the tiny task (held-out masked_pixel after 100 steps): +9.4% with it, +6.4%
            without. Keep the window in the noisy half, or the group's samples barely differ.
        rollout_tail_steps: after the window, a training rollout only has to land on a clean image for the
            rewards; nothing after the window is trained. This many Euler steps over an even subset of the
            remaining schedule (always ending at sigma 0) replace the schedule's own, as MixGRPO's fast variant
            does with a higher-order solver. The stored window states and log-probs are unchanged; only the reward
            sees a coarser finish. Held-out evaluation always uses the full schedule.
    Rewards:
        rewards: the recipe's list ``[{name: masked_pixel, weight: 1.0, ...}, ...]`` (see rewards/README.md).
    Spatial credit:
        spatial_advantage_mix: 0 = one advantage per image; 1 = each token takes the group-normalised reward
            of the patch covering it (from rewards that give per-patch maps; a token whose patch has no score
            takes the image's advantage); in between mixes the two. Per-token credit makes each token its own
            bandit: on the tiny task masked_pixel with 4 px patches (one token) learns with mix 1 (+9% held-out
            in 100 steps) and not with mix 0 (-7.5%).
    EMA:
        ema_decay: EMA of the trained weights (0 = off); held-out evaluation and the saved ``ema/`` use it.

    Defaults that differ from TRL's language-model defaults, on purpose: ``learning_rate`` 1e-4 (LoRA on a
    diffusion transformer; TRL's 1e-6 suits full LM fine-tuning), ``activation_checkpointing`` False (diffusers'
    own checkpointing is enabled when True), ``beta`` 0.01, ``epsilon`` 1e-3, ``num_generations`` 8,
    ``logging_steps`` 1, ``remove_unused_columns`` False, ``report_to`` wandb (offline without an API key),
    ``bf16`` on with CUDA only (TRL turns it on everywhere; on a CPU autocast only slows rollouts down).
    """

    rewards: list | str | None = field(
        default=None, metadata={"help": "Reward recipe: list of {name, weight, **options}."}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps of a rollout."})
    sde_type: str = field(
        default="flow_sde", metadata={"help": f"Step rule of stochastic steps: {', '.join(STEP_RULES)}."}
    )
    noise_level: float = field(
        default=0.9, metadata={"help": "SDE noise level a (about 0.7 for SD3, 0.9 for Flux/Kontext)."}
    )
    sde_window_size: int = field(default=2, metadata={"help": "Number of stochastic, trained steps per rollout."})
    sde_window_start: int = field(default=0, metadata={"help": "First stochastic step (fixed mode)."})
    sde_window_mode: str = field(default="fixed", metadata={"help": f"Window placement: {', '.join(WINDOW_MODES)}."})
    sde_window_stride: int = field(default=1, metadata={"help": "Sliding mode: steps the window moves per rollout."})
    sde_window_max_start: int | None = field(
        default=None, metadata={"help": "Latest window start (sliding/random); default num_inference_steps - 1 - size."}
    )
    rollout_tail_steps: int | None = field(
        default=None,
        metadata={
            "help": "ODE steps from the end of the SDE window to sigma 0 in training rollouts (None: the schedule's own). Fewer steps = cheaper rollouts; held-out evaluation keeps the full schedule."
        },
    )
    true_cfg_scale: float = field(
        default=1.0, metadata={"help": "True classifier-free guidance scale (>1 runs a negative-prompt pass)."}
    )
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt for true CFG."})
    start_sigma: float = field(
        default=1.0, metadata={"help": "Start sampling from the draft noised to this sigma (1 = pure noise)."}
    )
    shared_initial_noise: bool = field(
        default=True,
        metadata={
            "help": "All samples of a group start from the same noise; they differ only by the SDE steps' noise."
        },
    )
    paste_back: bool = field(default=False, metadata={"help": "Keep the draft outside the mask in sampled images."})
    adv_clip_max: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to [-adv_clip_max, adv_clip_max]."}
    )
    spatial_advantage_mix: float = field(
        default=0.0, metadata={"help": "0 = scalar advantages; 1 = per-patch advantages from reward maps."}
    )
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of trained weights (0 = off)."})
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per rollout forward (default: per_device_train_batch_size)."}
    )
    log_samples: bool = field(
        default=True,
        metadata={"help": "Log a W&B table draft | reference | sample | target | rewards each logging step."},
    )
    num_log_samples: int = field(default=4, metadata={"help": "Rows of that table."})

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (LoRA)."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "diffusers' gradient checkpointing of the transformer."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5)."}
    )
    beta: float = field(default=0.01, metadata={"help": "KL coefficient (0 = no reference forward)."})
    epsilon: float = field(default=1e-3, metadata={"help": "Lower clip range of the importance ratio."})
    num_generations: int | None = field(default=8, metadata={"help": "Samples per condition (group size)."})
    loss_type: str = field(
        default="grpo", metadata={"help": f"One of {LOSS_TYPES}; all reduce to the same mean for images."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep image columns (must stay False)."}
    )
    report_to: None | str | list[str] = field(
        default="wandb", metadata={"help": "Loggers: wandb (offline without an API key), none."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on with CUDA)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})

    def __post_init__(self):
        if isinstance(self.rewards, str):
            self.rewards = json.loads(self.rewards)
        if not self.rewards:
            raise ValueError(
                "`rewards` is empty: give a list such as [{name: masked_pixel, weight: 1.0}] (see `refiner-rl rewards list`)"
            )
        if self.reward_weights is not None:
            if len(self.reward_weights) != len(self.rewards):
                raise ValueError(
                    f"`reward_weights` has {len(self.reward_weights)} entries but `rewards` has {len(self.rewards)}"
                )
            self.rewards = [dict(r, weight=w) for r, w in zip(self.rewards, self.reward_weights)]
        if self.sde_type not in STEP_RULES:
            raise ValueError(f"`sde_type` must be one of {STEP_RULES}, got {self.sde_type!r}")
        if self.sde_window_mode not in WINDOW_MODES:
            raise ValueError(f"`sde_window_mode` must be one of {WINDOW_MODES}, got {self.sde_window_mode!r}")
        if self.sde_type == "ode":
            raise ValueError("`sde_type: ode` has no log-prob to train; pick flow_sde, cps or dance")
        if not 1 <= self.sde_window_size <= self.num_inference_steps - 1:
            raise ValueError(
                f"`sde_window_size` ({self.sde_window_size}) must be in [1, num_inference_steps - 1 = {self.num_inference_steps - 1}]: "
                "the last, nearly clean step is never trained"
            )
        if (
            self.sde_window_mode == "fixed"
            and self.sde_window_start + self.sde_window_size > self.num_inference_steps - 1
        ):
            raise ValueError(
                f"`sde_window_start` + `sde_window_size` ({self.sde_window_start} + {self.sde_window_size}) must be <= "
                f"num_inference_steps - 1 = {self.num_inference_steps - 1}: lower the start or the size"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.spatial_advantage_mix <= 1.0:
            raise ValueError("`spatial_advantage_mix` must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("`ema_decay` must be in [0, 1)")
        if self.rollout_tail_steps is not None and self.rollout_tail_steps < 1:
            raise ValueError(
                f"`rollout_tail_steps` must be >= 1 (or null for the full schedule), got {self.rollout_tail_steps}"
            )
        if not 0.0 < self.start_sigma <= 1.0:
            raise ValueError("`start_sigma` must be in (0, 1]")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False: the batches carry images")
        if self.bf16 is None:
            # TRL turns bf16 on whenever it is unset, CPU included: there autocast makes rollouts slow and the
            # log-probs imprecise. Default to it on CUDA only.
            import torch

            self.bf16 = bool(torch.cuda.is_available() and not self.use_cpu and not self.fp16)
        # Under `accelerate launch` without CUDA: gloo process group, reused by the Trainer (before the device setup).
        prepare_cpu_distributed(self)
        super().__post_init__()
        if self.rollout_batch_size is None:
            self.rollout_batch_size = self.per_device_train_batch_size
        if self.save_strategy == "steps" and self.save_steps and self.save_steps >= 1:
            gen_every = self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps
            if gen_every > 1 and int(self.save_steps) % gen_every:
                raise ValueError(
                    f"`save_steps` ({int(self.save_steps)}) must be a multiple of the optimizer steps per rollout "
                    f"({gen_every} = steps_per_generation * num_iterations / gradient_accumulation_steps), so a resume starts at a rollout"
                )

    @property
    def generate_every(self) -> int:
        """Micro-steps fed by one rollout."""
        return self.steps_per_generation * self.num_iterations
