"""``refiner-rl sft`` and ``refiner-rl grpo``: parse a recipe (TrlParser YAML + ``--key value``
overrides), build the policy and data, train, save. Both run the same under ``accelerate launch``."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("refiner_rl")


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_recipe(dataclass_types, argv: list[str]):
    """TrlParser over ``dataclass_types``; unknown YAML keys fail naming the key."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as e:
        if "Unknown arguments from config file" in str(e):
            raise SystemExit(f"refiner-rl: bad recipe key: {e}") from None
        raise


def _device(config):
    from accelerate import PartialState

    return PartialState().device if not getattr(config, "use_cpu", False) else "cpu"


def sft_main(argv: list[str]) -> int:
    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
    from transformers import set_seed

    from refiner_rl.distributed import frozen_model_context
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer

    _setup_logging()
    model_args, data_args, config = parse_recipe((ModelArguments, DataArguments, FlowSFTConfig), argv)
    set_seed(config.seed)  # the LoRA's A matrices are random: every process (and every rerun) must draw the same
    with frozen_model_context():  # under ZeRO-3, the codec and text encoders must not be partitioned
        policy = build_policy(model_args, _device(config))
    multiple = policy.codec.downsample * 2
    train = data_args.build(multiple=multiple)
    eval_ds = data_args.build(multiple=multiple, eval=True) if data_args.eval_dataset else None
    logger.info("SFT on %d records (%d skipped); policy %s, LoRA=%s", len(train), len(train.report.skipped),
                model_args.model_name_or_path, model_args.use_lora)  # fmt: skip
    trainer = FlowSFTTrainer(policy, config, train, eval_dataset=eval_ds)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("saved to %s", os.path.abspath(config.output_dir))
    return 0


def grpo_main(argv: list[str]) -> int:
    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
    from transformers import set_seed

    from refiner_rl.distributed import frozen_model_context
    from refiner_rl.scoring.registry import build_rewards
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig
    from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer

    _setup_logging()
    model_args, data_args, config = parse_recipe((ModelArguments, DataArguments, FlowGRPOConfig), argv)
    set_seed(config.seed)  # the LoRA's A matrices are random: every process (and every rerun) must draw the same
    with frozen_model_context():  # under ZeRO-3, codec, text encoders and reward models must not be partitioned
        policy = build_policy(model_args, _device(config))
        rewards = build_rewards(config.rewards)
    multiple = policy.codec.downsample * 2
    train = data_args.build(multiple=multiple)
    eval_ds = data_args.build(multiple=multiple, eval=True)
    trainer = FlowGRPOTrainer(policy, config, rewards, train, eval_dataset=eval_ds)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("saved to %s", os.path.abspath(config.output_dir))
    return 0
