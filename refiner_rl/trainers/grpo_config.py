"""Configuration of the GRPO stage: TRL's ``GRPOConfig`` vocabulary plus the flow-matching knobs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, get_args

from trl import GRPOConfig

from refiner_rl.distributed import prepare_cpu_distributed
from refiner_rl.dynamics.steps import STEP_RULES, StepRule
from refiner_rl.dynamics.window import WINDOW_MODES, WindowMode
from refiner_rl.errors import ConfigError
from refiner_rl.focus import FocusArguments

# Every image has the same number of latent dims, so TRL's token-normalised losses reduce to one mean. TRL's other
# losses (cispo, sapo, luspo, vespo) reshape per-token importance weights of a language model; they are not
# implemented for flow policies and are refused by name.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}
# What happens after the group rollout and its advantages (docs/algorithms.md#objectives-on-the-same-rollouts).
Objective = Literal["grpo", "nft", "awm"]
TrainTimestepSampling = Literal["uniform", "logit_normal", "schedule"]
OldPolicy = Literal["rollout", "ema"]
OBJECTIVES = get_args(Objective)
TRAIN_TIMESTEP_SAMPLING = get_args(TrainTimestepSampling)
OLD_POLICIES = get_args(OldPolicy)

# GRPOConfig fields that mean nothing for an image policy (text generation, vLLM, tokenizer padding, LM-only
# losses and logging). Setting one to anything but its default is a ConfigError naming it.
LM_ONLY_FIELDS = (
    "model_init_kwargs",
    "router_aux_loss_coef",
    "disable_dropout",
    "cast_lm_head_to_fp32",
    "num_generations_eval",
    "max_completion_length",
    "ds3_gather_for_generation",
    "pad_to_multiple_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "generation_kwargs",
    "chat_template_kwargs",
    "repetition_penalty",
    "cache_implementation",
    "use_vllm",
    "delta",
    "sapo_temperature_neg",
    "sapo_temperature_pos",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "importance_sampling_level",
    "mask_truncated_completions",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "top_entropy_quantile",
    "entropy_coef",
    "use_adaptive_entropy",
    "entropy_coef_min",
    "entropy_coef_max",
    "entropy_coef_delta",
    "entropy_target",
    "max_tool_calling_iterations",
    "off_policy_mask_threshold",
    "use_bias_correction_kl",
    "log_completions",
    "log_multimodal",
    "num_completions_to_print",
    "log_unique_prompts",
    "log_completions_hub_repo",
    "use_transformers_continuous_batching",
    "transformers_continuous_batching_config",
    "use_transformers_paged",
    "use_liger_kernel",
    "use_liger_loss",
)
LM_ONLY_PREFIXES = ("vllm_",)
HINTS = {"log_completions": "use `log_samples` (a W&B table of images)", "temperature": "use `noise_level`"}


@dataclass
class FlowGRPOConfig(FocusArguments, GRPOConfig):
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
        scale_rewards (group | batch | none; TRL's True / False mean group / none), multi_objective_aggregation
            (sum_then_normalize | normalize_then_sum), reward_weights: as in TRL. adv_clip_max clips advantages.
        loss_type: grpo, bnpo, dr_grpo and dapo are accepted and equal: every image has the same number of
            latent dims, so their normalisations reduce to the same mean. TRL's cispo, sapo, luspo and vespo
            reweight per-token ratios of a language model and are refused (ConfigError).
    Objectives on the same rollouts (everything else above and below is shared):
        objective: ``grpo`` (SDE window, per-step log-probs, clipped surrogate), or ``nft`` (DiffusionNFT) /
            ``awm`` (Advantage Weighted Matching): ODE rollouts (no SDE, no log-probs; each sample its own initial
            noise, so ``shared_initial_noise`` must stay off), then each clean sample x0 is re-noised
            ``x_t = (1 - t) x0 + t eps`` at ``train_timesteps`` times t and trained with the flow-matching forward
            (its draft/reference tokens as in the rollout). The old policy's velocity on x_t is taken at rollout
            time, from the rollout weights (``old_policy: rollout``) or their EMA (``old_policy: ema``, the EMA of
            ``ema_decay``). ``beta`` > 0 adds ``beta * mean (v_theta - v_ref)^2`` on the same x_t.
        ratio_normalization: GRPO-Guard's per-timestep normalised log-ratio (``objective: grpo`` only).
        train_timesteps, train_timestep_sampling (uniform | logit_normal on [0, start_sigma], or ``schedule``:
            distinct sigmas of the rollout's schedule), nft_beta (the mix of v+-; 1 = v+ is the policy itself),
            nft_adaptive_weight (each sample's squared x0 error over its no-grad mean absolute error, as
            DiffusionNFT's code does), awm_scale (inverse temperature of AWM's likelihood ratio
            ``exp(-scale (e_theta - e_old))``). NFT's ``A_max`` is ``adv_clip_max``; AWM clips its ratio with
            ``epsilon``/``epsilon_high``.
    Not for images: TRL's text-generation, vLLM, padding, LM-only loss and completion-logging fields (listed in
        ``LM_ONLY_FIELDS``, plus every ``vllm_*``) must keep their defaults; any other value is a ConfigError
        naming the field.
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
        rewards: the recipe's list ``[{name: masked_pixel, weight: 1.0, ...}, ...]`` (see rewards/README.md);
            entries may also name a plain function by dotted path. Each entry's ``weight`` moves into TRL's
            ``reward_weights`` (default 1.0); giving both ``weight:`` entries and ``reward_weights`` is an error.
            In Python the rewards may instead be given to the trainer as ``reward_funcs``.
        max_failed_reward_steps: after this many consecutive rollouts in which some reward scored no sample, the
            run writes a checkpoint and stops with a RewardError naming the reward and its last error.
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
        default=None,
        metadata={"help": "Reward recipe: list of {name, weight, **options} (or give `reward_funcs` to the trainer)."},
    )
    max_failed_reward_steps: int = field(
        default=3,
        metadata={
            "help": "Stop (after writing a checkpoint) when some reward scored no sample in this many consecutive rollouts."
        },
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps of a rollout."})
    sde_type: StepRule = field(default="flow_sde", metadata={"help": "Step rule of stochastic steps."})
    noise_level: float = field(
        default=0.9, metadata={"help": "SDE noise level a (about 0.7 for SD3, 0.9 for Flux/Kontext)."}
    )
    sde_window_size: int = field(default=2, metadata={"help": "Number of stochastic, trained steps per rollout."})
    sde_window_start: int = field(default=0, metadata={"help": "First stochastic step (fixed mode)."})
    sde_window_mode: WindowMode = field(default="fixed", metadata={"help": "Window placement."})
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
    shared_initial_noise: bool | None = field(
        default=None,
        metadata={
            "help": "All samples of a group start from the same noise; they differ only by the SDE steps' noise (default: on for objective grpo, off otherwise)."
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
    objective: Objective = field(default="grpo", metadata={"help": "What trains on the rollouts."})
    ratio_normalization: bool = field(
        default=False, metadata={"help": "GRPO-Guard: normalise the log-ratio per timestep (objective grpo)."}
    )
    train_timesteps: int = field(
        default=2, metadata={"help": "nft/awm: re-noised timesteps per sample and update (one backward each)."}
    )
    train_timestep_sampling: TrainTimestepSampling = field(
        default="uniform", metadata={"help": "nft/awm: how t is drawn (within [0, start_sigma])."}
    )
    old_policy: OldPolicy = field(
        default="rollout", metadata={"help": "nft/awm: the old policy: the rollout weights, or the EMA of ema_decay."}
    )
    nft_beta: float = field(default=1.0, metadata={"help": "nft: beta of the implicit policies v+- (> 0)."})
    nft_adaptive_weight: bool = field(
        default=True,
        metadata={"help": "nft: divide each sample's x0 error by its no-grad mean |x0 error| (DiffusionNFT's code)."},
    )
    awm_scale: float = field(default=1.0, metadata={"help": "awm: inverse temperature of the likelihood ratio."})
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per rollout forward (default: per_device_train_batch_size)."}
    )
    log_samples: bool = field(
        default=True,
        metadata={"help": "Log a W&B table draft | reference | sample | target | rewards each logging step."},
    )
    num_log_samples: int = field(default=4, metadata={"help": "Rows of that table."})
    sample_steps: int = field(
        default=100, metadata={"help": "Save the last rollout's grid to output_dir/samples/ (and W&B) every N steps."}
    )

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
        self._check_lm_only_fields()
        if isinstance(self.rewards, str):
            self.rewards = json.loads(self.rewards)
        if self.rewards is not None:
            self.rewards, self.reward_weights = _split_reward_weights(self.rewards, self.reward_weights)
        scale = self.scale_rewards
        key = str(scale).lower() if isinstance(scale, (bool, str)) else None
        if key not in SCALE_REWARDS:
            raise ConfigError(
                f"`scale_rewards` must be group, batch or none (or true = group, false = none), got {scale!r}"
            )
        self.scale_rewards = SCALE_REWARDS[key]
        if self.max_failed_reward_steps < 1:
            raise ConfigError(f"`max_failed_reward_steps` must be >= 1, got {self.max_failed_reward_steps}")
        self._check_objective()
        if self.sde_type not in STEP_RULES:
            raise ConfigError(f"`sde_type` must be one of {STEP_RULES}, got {self.sde_type!r}")
        if self.sde_window_mode not in WINDOW_MODES:
            raise ConfigError(f"`sde_window_mode` must be one of {WINDOW_MODES}, got {self.sde_window_mode!r}")
        if self.sde_type == "ode" and self.objective == "grpo":
            raise ConfigError("`sde_type: ode` has no log-prob to train; pick flow_sde, cps or dance")
        if self.objective == "grpo" and not 1 <= self.sde_window_size <= self.num_inference_steps - 1:
            raise ConfigError(
                f"`sde_window_size` ({self.sde_window_size}) must be in [1, num_inference_steps - 1 = {self.num_inference_steps - 1}]: "
                "the last, nearly clean step is never trained"
            )
        if (
            self.objective == "grpo"
            and self.sde_window_mode == "fixed"
            and self.sde_window_start + self.sde_window_size > self.num_inference_steps - 1
        ):
            raise ConfigError(
                f"`sde_window_start` + `sde_window_size` ({self.sde_window_start} + {self.sde_window_size}) must be <= "
                f"num_inference_steps - 1 = {self.num_inference_steps - 1}: lower the start or the size"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"`loss_type: {self.loss_type}` is not implemented for flow policies; use one of {', '.join(LOSS_TYPES)} "
                "(they are the same loss for images)"
            )
        if not 0.0 <= self.spatial_advantage_mix <= 1.0:
            raise ConfigError("`spatial_advantage_mix` must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("`ema_decay` must be in [0, 1)")
        if self.rollout_tail_steps is not None and self.rollout_tail_steps < 1:
            raise ConfigError(
                f"`rollout_tail_steps` must be >= 1 (or null for the full schedule), got {self.rollout_tail_steps}"
            )
        if not 0.0 < self.start_sigma <= 1.0:
            raise ConfigError("`start_sigma` must be in (0, 1]")
        if self.remove_unused_columns:
            raise ConfigError("`remove_unused_columns` must be False: the batches carry images")
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
                raise ConfigError(
                    f"`save_steps` ({int(self.save_steps)}) must be a multiple of the optimizer steps per rollout "
                    f"({gen_every} = steps_per_generation * num_iterations / gradient_accumulation_steps), so a resume starts at a rollout"
                )

    @property
    def generate_every(self) -> int:
        """Micro-steps fed by one rollout."""
        return self.steps_per_generation * self.num_iterations

    def _check_objective(self) -> None:
        """ConfigError for an unknown objective or a setting the chosen one cannot use; fills
        ``shared_initial_noise``'s default (on for grpo; off for nft/awm, whose ODE rollouts would all coincide)."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.shared_initial_noise is None:
            self.shared_initial_noise = self.objective == "grpo"
        if self.objective == "grpo":
            return
        if self.shared_initial_noise:
            raise ConfigError(
                f"`shared_initial_noise: true` with `objective: {self.objective}`: its rollouts are ODE, so a group "
                "sharing one noise would be one image repeated; set it to false"
            )
        if self.ratio_normalization:
            raise ConfigError("`ratio_normalization` (GRPO-Guard) applies to `objective: grpo` only")
        if self.train_timesteps < 1:
            raise ConfigError(f"`train_timesteps` must be >= 1, got {self.train_timesteps}")
        if self.train_timestep_sampling not in TRAIN_TIMESTEP_SAMPLING:
            raise ConfigError(
                f"`train_timestep_sampling` must be one of {', '.join(TRAIN_TIMESTEP_SAMPLING)}, "
                f"got {self.train_timestep_sampling!r}"
            )
        if self.train_timestep_sampling == "schedule" and self.train_timesteps > self.num_inference_steps:
            raise ConfigError(
                f"`train_timesteps` ({self.train_timesteps}) > num_inference_steps ({self.num_inference_steps}): "
                "`train_timestep_sampling: schedule` draws distinct sigmas of the rollout's schedule"
            )
        if self.old_policy not in OLD_POLICIES:
            raise ConfigError(f"`old_policy` must be one of {', '.join(OLD_POLICIES)}, got {self.old_policy!r}")
        if self.old_policy == "ema" and self.ema_decay <= 0:
            raise ConfigError("`old_policy: ema` needs `ema_decay` > 0 (the EMA it reads), e.g. 0.9")
        if self.objective == "nft" and not self.nft_beta > 0:
            raise ConfigError(f"`nft_beta` must be > 0, got {self.nft_beta}")
        if self.objective == "nft" and not (self.adv_clip_max and self.adv_clip_max > 0):
            raise ConfigError(
                "`objective: nft` needs `adv_clip_max` > 0: it maps advantages to r = A / (2 A_max) + 1/2"
            )
        if self.awm_scale <= 0:
            raise ConfigError(f"`awm_scale` must be > 0, got {self.awm_scale}")

    def _check_lm_only_fields(self) -> None:
        """ConfigError naming every GRPOConfig field that means nothing for images and is not at its default."""
        bad = []
        for f in dataclasses.fields(GRPOConfig):
            if f.name not in LM_ONLY_FIELDS and not f.name.startswith(LM_ONLY_PREFIXES):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if getattr(self, f.name) != default:
                hint = f" ({HINTS[f.name]})" if f.name in HINTS else ""
                bad.append(f"`{f.name}: {getattr(self, f.name)!r}`{hint}")
        if bad:
            raise ConfigError(
                f"{', '.join(bad)}: no meaning for an image policy (a TRL option for language models); remove it"
            )


def _split_reward_weights(specs, reward_weights):
    """``(specs without weight, weights)`` from the recipe's ``rewards`` and TRL's ``reward_weights``: per-entry
    ``weight:`` values move into the weights (entries without one weigh 1.0); ``reward_weights`` alone is used as
    given; both at once is a ConfigError."""
    from refiner_rl.scoring.registry import split_weights

    if isinstance(specs, (str, dict)) or not isinstance(specs, (list, tuple)):
        raise ConfigError("`rewards` must be a list of specs like [{name: masked_pixel, weight: 1.0}]")
    specs, weights = split_weights(list(specs))
    if weights is not None and reward_weights is not None:
        raise ConfigError(
            "give reward weights either as `weight:` in each `rewards` entry or as `reward_weights`, not both"
        )
    weights = weights if weights is not None else reward_weights
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"`reward_weights` has {len(weights)} entries but `rewards` has {len(specs)}")
    return specs, [float(w) for w in weights] if weights is not None else None
