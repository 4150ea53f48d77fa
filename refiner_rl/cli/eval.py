"""``refiner-rl eval``: compare named candidates (the draft, the base editor, trainer checkpoints) on held-out
triplets with metric plug-ins, sampled alike.

    refiner-rl eval --config recipes/eval/refiner.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 2 \\
        -m refiner_rl eval --config recipes/eval/refiner.yaml

Writes ``results.md`` (candidates x metrics, mean ± 95% CI), ``results.json`` (per-record values), ``samples.png``
(draft | reference | candidates | target) to ``output_dir`` and, with ``report_to: wandb``, a W&B run; prints the
table. The recipe holds the base model (ModelArguments), the data (DataArguments: ``eval_dataset`` if set, else
``dataset``; ``synthetic`` means its held-out split) and the keys below. A checkpoint that holds
``refiner_rl_model.json`` (the trainers write it) is served with the ``reference_alignment`` and
``reference_positions`` it was trained with; setting either to another value is an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from refiner_rl.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """What to compare, how to sample, what to measure and where to write it."""

    candidates: list | str | None = field(
        default=None,
        metadata={
            "help": "List of {name, checkpoint: draft | base | FOLDER, transformer_path?, ema?}: a LoRA folder, a "
            "full fine-tune (FOLDER/transformer) or, with ema: true, FOLDER/ema."
        },
    )
    metrics: list | str | None = field(
        default=None,
        metadata={
            "help": "List of metric entries ({name, **options}); default: masked MSE in/out, PSNR in, change out."
        },
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.md/json and samples.png go."})
    num_inference_steps: int = field(default=10, metadata={"help": "ODE sampling steps, the same for every candidate."})
    seed: int = field(default=0, metadata={"help": "Noise seed; record i's noise is keyed by (seed, i)."})
    start_sigma: float = field(default=1.0, metadata={"help": "1 = from noise; below 1 from the draft noised to it."})
    paste_back: bool = field(default=False, metadata={"help": "Keep the draft outside the mask."})
    true_cfg_scale: float = field(default=1.0, metadata={"help": "True CFG scale (1 = off)."})
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt for true CFG."})
    batch_size: int = field(default=8, metadata={"help": "Records per sampling and metric call."})
    max_records: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    grid_records: int = field(default=4, metadata={"help": "Records shown in samples.png."})
    report_to: str = field(default="none", metadata={"help": "`wandb` (offline without an API key) or `none`."})
    wandb_project: str = field(default="refiner-rl", metadata={"help": "W&B project."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        for key in ("candidates", "metrics"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    setattr(self, key, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"`{key}` must be a YAML list (or a JSON list string): {err}") from err
        if self.report_to not in ("wandb", "none"):
            raise ConfigError(f"`report_to` must be wandb or none, got {self.report_to!r}")
        if self.batch_size < 1 or self.num_inference_steps < 1:
            raise ConfigError("`batch_size` and `num_inference_steps` must be >= 1")


DEFAULT_METRICS = [
    {"name": "masked_mse", "region": "inside"},
    {"name": "masked_mse", "region": "outside"},
    {"name": "masked_psnr", "region": "inside"},
    {"name": "change_outside"},
]


def main(argv: list[str]) -> int:
    from refiner_rl.cli.train import _recipe_parser, _setup_logging, parse_recipe
    from refiner_rl.configs import DataArguments, ModelArguments

    types = (ModelArguments, DataArguments, EvalArguments)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        _recipe_parser(types, "refiner-rl eval").print_help()
        return 0
    _setup_logging()
    model_args, data_args, args = parse_recipe(types, argv, "refiner-rl eval")

    from refiner_rl.evaluation import SamplerSettings, evaluate_candidates, parse_candidates
    from refiner_rl.metrics.base import build_metrics

    candidates = parse_candidates(args.candidates)
    metrics = build_metrics(args.metrics or DEFAULT_METRICS)  # load every model before sampling starts

    def dataset(multiple: int):
        return data_args.build(multiple=multiple, eval=True) or data_args.build(multiple=multiple)

    result = evaluate_candidates(
        candidates,
        dataset,
        metrics,
        model_args,
        sampler=SamplerSettings(
            num_steps=args.num_inference_steps,
            seed=args.seed,
            start_sigma=args.start_sigma,
            paste=args.paste_back,
            true_cfg_scale=args.true_cfg_scale,
            negative_prompt=args.negative_prompt,
        ),
        batch_size=args.batch_size,
        grid_records=args.grid_records,
        output_dir=args.output_dir,
        report_to=args.report_to,
        wandb_project=args.wandb_project,
        run_name=args.run_name,
        progress=not args.disable_tqdm,
        max_records=args.max_records,
        reference_alignment=data_args.reference_alignment,  # None: each checkpoint's saved one (else none)
    )
    if result.table:
        print("\n" + result.table + "\n")
        print(f"[eval] {', '.join(f'{k}: {os.path.abspath(v)}' for k, v in result.files.items())}")
    return 0
