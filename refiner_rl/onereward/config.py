"""Configuration of ``refiner-rl reward-model``: the data arguments and the trainer's config dataclass.

The recipe is parsed by ``trl.TrlParser`` over ``(JudgeDataArguments, JudgeConfig, trl.ModelConfig)``, as TRL's
own scripts parse ``(ScriptArguments, RewardConfig, ModelConfig)``; LoRA comes from ``trl.get_peft_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class JudgeDataArguments:
    """Preference records and the templates the judge is asked with."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "Preference records: a JSONL file (image paths relative to it), a folder with pairs.jsonl, or "
            "`synthetic` (refine pairs on the templates' refine dimensions)."
        },
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out records (same forms as `dataset`); accuracy per task x dimension."}
    )
    templates: str | None = field(
        default=None,
        metadata={"help": "YAML/JSON file extending the tasks, dimensions and question (default: the built-in ones)."},
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip (and count) bad records instead of stopping at the first."}
    )
    synthetic_pairs: int = field(default=96, metadata={"help": "Training pairs of the synthetic set."})
    synthetic_eval_pairs: int = field(default=48, metadata={"help": "Held-out pairs of the synthetic set."})
    synthetic_size: int = field(default=32, metadata={"help": "Image side of the synthetic set (pixels)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set (held-out: seed + 1)."})
    synthetic_kind: str = field(
        default="detail",
        metadata={
            "help": "How the detail-fidelity candidates differ inside the mask: `detail` (less of the true detail "
            "loses), `noise` (more Gaussian noise loses), `swap` / `shift` (twins: another record's detail or the "
            "true detail shifted; only the reference tells which wins), `degrade` (the data build's blur, JPEG, "
            "down/up-sampling or their mix, the stronger loses); several joined with + (not detail), e.g. "
            "`swap+shift+degrade`."
        },
    )
    synthetic_region: float = field(default=0.5, metadata={"help": "Side of the masked region / image side."})


@dataclass
class JudgeConfig(TrainingArguments):
    """``transformers.TrainingArguments`` plus the judge's answer tokens, pixel budget and report table.

    Parameters beyond TrainingArguments: ``prob`` (``yes_no`` | ``softmax``, how P(Yes) is read),
    ``yes_words`` / ``no_words`` (each must be one token of the tokenizer), ``min_pixels`` / ``max_pixels`` (the
    image processor's budget), ``system_prompt``, ``accuracy_table`` (file in ``output_dir`` with the held-out
    accuracy per task x dimension).
    """

    prob: str = field(
        default="yes_no", metadata={"help": "P(Yes): `yes_no` (over Yes+No) or `softmax` (over the vocabulary)."}
    )
    yes_words: list[str] = field(default_factory=lambda: ["Yes", " Yes"], metadata={"help": "Yes answer words."})
    no_words: list[str] = field(default_factory=lambda: ["No", " No"], metadata={"help": "No answer words."})
    min_pixels: int | None = field(default=None, metadata={"help": "Smallest image size (pixels) after resizing."})
    max_pixels: int | None = field(default=None, metadata={"help": "Largest image size (pixels) after resizing."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt of every chat."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code (hub models)."})
    tiny_patch_size: int = field(
        default=14,
        metadata={"help": "model_name_or_path: tiny: the vision patch (the image side is a multiple of 2x)."},
    )
    tiny_vision_init_std: float | None = field(
        default=None, metadata={"help": "model_name_or_path: tiny: std of the vision weights (default: 0.15)."}
    )
    accuracy_table: str = field(
        default="judge_accuracy.md", metadata={"help": "Held-out accuracy table, written in output_dir."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the record columns."}
    )

    def __post_init__(self):
        if self.prob not in ("yes_no", "softmax"):
            raise ValueError(f"prob {self.prob!r}: use yes_no or softmax")
        if not self.yes_words or not self.no_words:
            raise ValueError("yes_words and no_words must each name at least one word")
        self.remove_unused_columns = False
        super().__post_init__()
