"""``refiner-rl planner``: train the decomposition agent with TRL's own ``SFTTrainer`` (warm start) and ``GRPOTrainer``.

The recipe is parsed by ``trl.TrlParser`` over ``(PlannerArguments, trl.GRPOConfig, trl.ModelConfig)``, the
same config classes TRL's VLM GRPO examples use; LoRA comes from ``trl.get_peft_config(model_config)``, vLLM
and W&B are ``GRPOConfig`` fields (``use_vllm``, ``vllm_mode``, ``report_to``). The data are decomposition
records (:mod:`refiner_rl.agents.data`), the rewards the text-only functions of :mod:`refiner_rl.agents.rewards`.

``model_name_or_path: tiny`` builds the tiny random planner (:mod:`refiner_rl.agents.tiny`) into
``{output_dir}/tiny-init`` first; ``dataset: synthetic`` generates the synthetic decomposition set
(``heldout_fraction`` keeps a share of its action/subject/goal combinations out of training, for the eval set).

``--stage sft`` (or ``stage: sft`` in the recipe) parses ``trl.SFTConfig`` instead of ``GRPOConfig`` and runs TRL's
``SFTTrainer`` on the same records in prompt-completion form: the prompt is the chat the GRPO stage samples from (the
image before the instruction), the completion the ground-truth plan as the assistant's answer, and only the completion
is trained (TRL's ``completion_only_loss``). The saved folder (model and processor) is a ``model_name_or_path`` for
the GRPO stage. ``--stage grpo`` is the default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("refiner_rl")


STAGES = ("grpo", "sft")


@dataclass
class PlannerArguments:
    """Data and rewards of the planner (the ScriptArguments of TRL's scripts, for decomposition records)."""

    stage: str = field(
        default="grpo",
        metadata={
            "help": "grpo (TRL's GRPOTrainer, GRPOConfig) or sft (TRL's SFTTrainer on the ground-truth plans, SFTConfig).",
            "choices": list(STAGES),
        },
    )
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "Decomposition records: a JSONL file (image paths relative to it), a folder with records.jsonl, a `datasets` name, or `synthetic`."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split for `datasets` names."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out records (same forms as `dataset`)."})
    synthetic_records: int = field(default=64, metadata={"help": "Records of the synthetic set (dataset: synthetic)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set."})
    heldout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of the synthetic set's (action, subject, goal) combinations held out: training records have none of them, eval records at least one."
        },
    )
    heldout_seed: int = field(default=0, metadata={"help": "Seed of the held-out combinations."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "action", "subject", "goal"],
        metadata={
            "help": "Rewards: format, format_partial, action, subject, goal, decomposition, or dotted paths. Weights: GRPOConfig's reward_weights."
        },
    )
    f1_match: str = field(
        default="token", metadata={"help": "F1 over word tokens (`token`) or whole components (`phrase`)."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Planner system prompt (default: the built-in one)."}
    )
    min_pixels: int | None = field(
        default=None, metadata={"help": "Smallest image size (pixels) the processor resizes to."}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "Largest image size (pixels) the processor resizes to."}
    )


def load_data(args: PlannerArguments, output_dir: str, eval: bool = False):
    """The training (or held-out) TRL dataset named by ``args``."""
    from refiner_rl.agents.data import load_decomposition_dataset
    from refiner_rl.agents.synthetic import synthetic_split, write_synthetic_decompositions

    source = args.eval_dataset if eval else args.dataset
    if source is None:
        return None
    if source == "synthetic":
        folder = os.path.join(output_dir, "synthetic-eval" if eval else "synthetic")
        n = max(8, args.synthetic_records // 8) if eval else args.synthetic_records
        seed = args.synthetic_seed + int(eval)
        records = synthetic_split(
            n, seed, heldout_fraction=args.heldout_fraction, heldout_seed=args.heldout_seed, train=not eval
        )
        source = write_synthetic_decompositions(folder, n, records=records)
    return load_decomposition_dataset(source, args.dataset_split, args.system_prompt)


def sft_dataset(ds):
    """A decomposition dataset in TRL's conversational prompt-completion form: the planner's prompt, the image, and
    the ground-truth plan as the assistant's completion."""
    if ds is None:
        return None
    ds = ds.map(lambda r: {"completion": [{"role": "assistant", "content": r["solution"]}]})
    return ds.select_columns(["prompt", "completion", "image"])


def requested_stage(argv: list[str]) -> str:
    """The ``stage`` of a command line: ``--stage X`` / ``--stage=X``, else the recipe's ``stage:``, else grpo."""
    import yaml

    from refiner_rl.errors import ConfigError

    stage, config = None, None
    for i, a in enumerate(argv):
        if a == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
        elif a.startswith("--stage="):
            stage = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    if stage is None and config is not None and os.path.isfile(config):
        try:
            with open(config) as f:
                recipe = yaml.safe_load(f)
        except yaml.YAMLError:
            recipe = None  # parse_recipe reports it
        if isinstance(recipe, dict):
            stage = recipe.get("stage")
    stage = stage or "grpo"
    if stage not in STAGES:
        raise ConfigError(f"planner: unknown `stage: {stage}`; use one of: {', '.join(STAGES)}")
    return stage


def build_processor(model_path: str, args: PlannerArguments, trust_remote_code: bool = False):
    """The model's processor with the pixel budget of ``args`` (``None``: TRL loads the processor itself)."""
    if args.min_pixels is None and args.max_pixels is None:
        return None
    from transformers import AutoProcessor

    size = {k: v for k, v in (("shortest_edge", args.min_pixels), ("longest_edge", args.max_pixels)) if v is not None}
    return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code, size=size)


def planner_main(argv: list[str]) -> int:
    stage = requested_stage(argv)  # before importing TRL: a wrong stage fails at once
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, SFTConfig, get_peft_config

    from refiner_rl.agents.rewards import planner_reward_funcs
    from refiner_rl.agents.tiny import build_tiny_planner
    from refiner_rl.cli.train import _setup_logging, parse_recipe
    from refiner_rl.errors import ConfigError

    _setup_logging()
    config_cls = SFTConfig if stage == "sft" else GRPOConfig
    args, config, model_args = parse_recipe((PlannerArguments, config_cls, ModelConfig), argv)
    if not model_args.model_name_or_path:
        raise ConfigError(
            "planner: set `model_name_or_path` (a VLM folder or hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct, or `tiny`)"
        )
    model_path = model_args.model_name_or_path
    if model_path == "tiny":
        model_path = build_tiny_planner(os.path.join(config.output_dir, "tiny-init"), seed=config.seed)
    train = load_data(args, config.output_dir)
    eval_ds = load_data(args, config.output_dir, eval=True)
    init = dict(
        revision=model_args.model_revision,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    config.model_init_kwargs = {**init, **(config.model_init_kwargs or {})}
    processor = build_processor(model_path, args, config.trust_remote_code)
    if stage == "sft":
        from trl import SFTTrainer

        logger.info("planner SFT on %d records (prompt -> ground-truth plan)", len(train))
        trainer = SFTTrainer(
            model=model_path,
            args=config,
            train_dataset=sft_dataset(train),
            eval_dataset=sft_dataset(eval_ds) if config.eval_strategy != "no" else None,
            processing_class=processor,
            peft_config=get_peft_config(model_args),
        )
        return _train_and_save(trainer, config)
    rewards = planner_reward_funcs(args.reward_funcs, args.f1_match)
    logger.info("planner GRPO on %d records, rewards %s", len(train), [f.__name__ for f in rewards])
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=rewards,
        args=config,
        train_dataset=train,
        eval_dataset=eval_ds if config.eval_strategy != "no" else None,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )
    return _train_and_save(trainer, config)


def _train_and_save(trainer, config) -> int:
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the logged rewards of the run
    if trainer.is_world_process_zero():
        logger.info("planner saved to %s", os.path.abspath(config.output_dir))
    return 0
