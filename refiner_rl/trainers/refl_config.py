"""Configuration of reward-gradient training (ReFL with a reference image, as OneReward trains its editor)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from transformers import TrainingArguments

from refiner_rl.distributed import prepare_cpu_distributed
from refiner_rl.errors import ConfigError

Reference = Literal["frozen", "ema"]
REFERENCES = get_args(Reference)


@dataclass
class FlowReFLConfig(TrainingArguments):
    """Reward-gradient fine-tuning (ReFL) of a flow-matching editor against a reference policy's image.

    Differentiable rewards are back-propagated through a one-step prediction, as OneReward (arXiv 2508.21066) trains
    its editor.

    Per optimizer step (every draw keyed by seed, step and record, so N processes train like one):
        a task k ~ task_mix; per sample noises eps1, eps2; a step t ~ U{t1..t2} of the num_inference_steps sampler.
        x_ref = the reference policy's full ODE sample from eps1 (no gradient); the policy runs steps 0..t-1 from eps2
        without gradient, then predicts x0 = x_t - sigma_t v_theta(x_t) in one step WITH gradient; both are decoded.
        loss = (1 / K_k) sum_{j in task k} w_j mean_i max(0, margin - r_j(x_theta_i, x_ref_i)).
    Reference:
        reference: ``frozen`` = the starting policy (Alg. 1; with LoRA the adapter switched off, no second copy;
            full fine-tuning keeps a frozen copy), ``ema`` = an EMA of the policy, ``ema_decay`` = tau (Alg. 2,
            OneReward-Dynamic: no frozen copy, the reference improves with the policy).
    Rewards:
        rewards, reward_weights: as GRPO's (``weight:`` per entry or ``reward_weights``). Every reward must be
            differentiable (masked_pixel, patch_dreamsim, dino_similarity, the pairwise vlm_judge); a reward with a
            ``task`` attribute scores that task only, one without scores every task.
        margin: lambda of the hinge. ``null`` = no hinge: the loss is ``-sum_j w_j mean r_j / K`` (plain reward ascent).
            For rewards <= 0 (masked_pixel) any margin >= 0 keeps the hinge always active, i.e. the same gradient
            as ``null``.
    Sampling: num_inference_steps, start_sigma, paste_back (as GRPO's); decode_checkpointing recomputes the decode
        of x_theta in the backward instead of keeping its activations (a real VAE's decode is the largest graph here).

    Defaults that differ from transformers' on purpose: ``learning_rate`` 1e-5 (OneReward's policy lr),
    ``logging_steps`` 1, ``remove_unused_columns`` False, ``report_to`` wandb (offline without an API key),
    ``max_grad_norm`` 1.0.
    """

    rewards: list | str | None = field(
        default=None,
        metadata={"help": "Reward recipe: list of {name, weight, **options}; every reward must be differentiable."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the rewards (default 1 each; or `weight:` per entry)."}
    )
    task_mix: dict | str | None = field(
        default=None,
        metadata={"help": "Task sampling probabilities {task: p_k} (normalised). Default {refine: 1}."},
    )
    margin: float | None = field(
        default=1.0, metadata={"help": "lambda of the hinge max(0, lambda - r); null = plain -r (no hinge)."}
    )
    reference: Reference = field(default="frozen", metadata={"help": "Reference policy of x_ref."})
    ema_decay: float = field(default=0.999, metadata={"help": "tau of the EMA reference (reference: ema)."})
    t1: int = field(default=0, metadata={"help": "Earliest sampler step at which the one-step prediction is trained."})
    t2: int | None = field(
        default=None, metadata={"help": "Latest such step (default num_inference_steps - 1); t ~ U{t1..t2}."}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Steps of the sampler (reference and policy)."})
    start_sigma: float = field(
        default=1.0, metadata={"help": "Start sampling from the draft noised to this sigma (1 = pure noise)."}
    )
    paste_back: bool = field(default=False, metadata={"help": "Keep the draft outside the mask in both images."})
    decode_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the decode of x_theta in the backward (less memory)."}
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "diffusers' gradient checkpointing of the transformer."}
    )
    log_samples: bool = field(
        default=True, metadata={"help": "Log a W&B table draft | reference | sample | target | rewards."}
    )
    num_log_samples: int = field(default=4, metadata={"help": "Rows of that table and of the sample grid."})
    sample_steps: int = field(
        default=100,
        metadata={"help": "Save the last step's draft | reference | x_theta | target | x_ref grid every N steps."},
    )

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (OneReward: 1e-5)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns (must stay False)."})
    report_to: None | str | list[str] = field(
        default="wandb", metadata={"help": "Loggers: wandb (offline without an API key), tensorboard, none."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})

    def __post_init__(self):
        from refiner_rl.trainers.grpo_config import _split_reward_weights

        if isinstance(self.rewards, str):
            self.rewards = json.loads(self.rewards)
        if self.rewards is not None:
            self.rewards, self.reward_weights = _split_reward_weights(self.rewards, self.reward_weights)
        self.task_mix = _task_mix(self.task_mix)
        if self.reference not in REFERENCES:
            raise ConfigError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"`ema_decay` (tau) must be in [0, 1), got {self.ema_decay}")
        if self.margin is not None and not math.isfinite(self.margin):
            self.margin = None  # lambda = +inf: the hinge never switches off, the same gradient as no hinge
        if self.num_inference_steps < 1:
            raise ConfigError("`num_inference_steps` must be >= 1")
        if self.t2 is None:
            self.t2 = self.num_inference_steps - 1
        if not 0 <= self.t1 <= self.t2 <= self.num_inference_steps - 1:
            raise ConfigError(
                f"need 0 <= t1 <= t2 <= num_inference_steps - 1 = {self.num_inference_steps - 1}, "
                f"got t1={self.t1}, t2={self.t2}"
            )
        if not 0.0 < self.start_sigma <= 1.0:
            raise ConfigError(f"`start_sigma` must be in (0, 1], got {self.start_sigma}")
        if self.remove_unused_columns:
            raise ConfigError("`remove_unused_columns` must be False: the batches carry images")
        if self.sample_steps < 0 or self.num_log_samples < 1:
            raise ConfigError("`sample_steps` must be >= 0 and `num_log_samples` >= 1")
        # Under `accelerate launch` without CUDA: gloo process group, reused by the Trainer (before the device setup).
        prepare_cpu_distributed(self)
        super().__post_init__()


def _task_mix(value) -> dict[str, float]:
    """``{task: p}`` normalised to sum 1 (a JSON string from the command line is parsed); ConfigError naming a bad entry."""
    if value is None:
        return {"refine": 1.0}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"`task_mix` must be a mapping {{task: probability}}, got {value!r}") from e
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"`task_mix` must be a non-empty mapping {{task: probability}}, got {value!r}")
    bad = [k for k, p in value.items() if not isinstance(p, (int, float)) or p < 0 or not math.isfinite(p)]
    if bad or sum(value.values()) <= 0:
        raise ConfigError(f"`task_mix`: probabilities must be finite, >= 0 and not all 0 (check {bad or list(value)})")
    total = float(sum(value.values()))
    return {str(k): float(p) / total for k, p in value.items()}
