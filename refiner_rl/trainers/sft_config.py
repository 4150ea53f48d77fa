"""Configuration of the SFT stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from refiner_rl.distributed import prepare_cpu_distributed
from refiner_rl.dynamics.schedules import (
    LOSS_WEIGHTING_SCHEMES,
    TRAINING_SIGMA_SCHEMES,
    LossWeighting,
    SigmaScheme,
)
from refiner_rl.errors import ConfigError
from refiner_rl.focus import FocusArguments


@dataclass
class FlowSFTConfig(FocusArguments, TrainingArguments):
    """Supervised fine-tuning of a flow-matching editor on (prompt, draft, reference, target, mask) triplets.

    Loss:
        mask_weight: lambda of the per-token weight ``1 + lambda * M`` (OmniRefiner's weighted mask loss;
            the paper does not publish it: 4.0 by default).
        timestep_sampling, logit_mean, logit_std, mode_scale, timestep_shift: how sigma is drawn.
        loss_weighting: SD3 loss weighting (none, sigma_sqrt, cosmap).
    Conditioning:
        caption_dropout: probability of training a sample with the empty instruction (0.05, as the authors'
            configs).
    Region focus (:class:`refiner_rl.focus.FocusArguments`):
        focus_crop, focus_size, focus_margin, focus_crop_reference, focus_feather: train on the crop around each
            mask at the working size (the loss is on the crop; sample grids show the crop pasted back).
    Samples:
        sample_steps, num_sample_images, sample_inference_steps: every ``sample_steps`` steps, sample the first
            held-out records and save draft | reference | sample | target to ``output_dir/samples/`` (and W&B).

    Defaults that differ from transformers' on purpose: ``learning_rate`` 1e-4 (LoRA), ``logging_steps`` 10,
    ``remove_unused_columns`` False (the batch carries images, not token ids), ``report_to`` wandb (offline
    when no API key is set), ``save_strategy`` steps every 500, ``max_grad_norm`` 1.0.
    """

    mask_weight: float = field(default=4.0, metadata={"help": "lambda in the per-token loss weight 1 + lambda * M."})
    timestep_sampling: SigmaScheme = field(default="logit_normal", metadata={"help": "Sigma sampling density."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal sigma density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal sigma density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the `mode` sigma density."})
    timestep_shift: float | None = field(
        default=None, metadata={"help": "Optional static shift of sampled sigmas (s' = k s / (1 + (k - 1) s))."}
    )
    loss_weighting: LossWeighting = field(default="none", metadata={"help": "SD3 loss weighting."})
    caption_dropout: float = field(
        default=0.05, metadata={"help": "Probability of replacing the instruction with the empty prompt."}
    )
    sample_steps: int = field(
        default=100, metadata={"help": "Save a sample grid to output_dir/samples/ (and W&B) every N steps (0 = off)."}
    )
    num_sample_images: int = field(default=4, metadata={"help": "Rows of the sample grid."})
    sample_inference_steps: int = field(default=10, metadata={"help": "ODE steps of the sample grid's samples."})

    learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate (1e-4 suits LoRA; use ~1e-5 for full fine-tuning)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns (must stay False)."})
    # `None | str | list[str]` in this order, as TrainingArguments: HfArgumentParser then reads a `str`.
    report_to: None | str | list[str] = field(
        default="wandb", metadata={"help": "Loggers: wandb (offline without an API key), tensorboard, none."}
    )
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps (atomic writes)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})

    def __post_init__(self):
        if self.sample_steps < 0 or self.num_sample_images < 1 or self.sample_inference_steps < 1:
            raise ConfigError("`sample_steps` must be >= 0, `num_sample_images` and `sample_inference_steps` >= 1")
        if self.timestep_sampling not in TRAINING_SIGMA_SCHEMES:
            raise ConfigError(
                f"`timestep_sampling` must be one of {TRAINING_SIGMA_SCHEMES}, got {self.timestep_sampling!r}"
            )
        if self.loss_weighting not in LOSS_WEIGHTING_SCHEMES:
            raise ConfigError(f"`loss_weighting` must be one of {LOSS_WEIGHTING_SCHEMES}, got {self.loss_weighting!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError("`caption_dropout` must be in [0, 1)")
        if self.mask_weight < 0:
            raise ConfigError("`mask_weight` must be >= 0")
        self.focus_settings()  # checks the focus_* fields
        if self.remove_unused_columns:
            raise ConfigError("`remove_unused_columns` must be False: the batches carry images")
        # Under `accelerate launch` without CUDA: gloo process group, reused by the Trainer (before the device setup).
        prepare_cpu_distributed(self)
        super().__post_init__()
