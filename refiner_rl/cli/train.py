"""``refiner-rl sft`` and ``refiner-rl grpo``: parse a recipe (TrlParser YAML + ``--key value``
overrides), build the policy and data, train, save. Both run the same under ``accelerate launch``."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

logger = logging.getLogger("refiner_rl")


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_recipe(dataclass_types, argv: list[str]):
    """TrlParser over ``dataclass_types``; unknown YAML keys fail naming the key.

    A name defined by two of the types (TRL's ``GRPOConfig`` also has ``trust_remote_code``) is one option: the
    last type parses it and the earlier ones receive the same value."""
    from trl import TrlParser

    types = list(dataclass_types)
    later = [set().union(*({f.name for f in dataclasses.fields(t)} for t in types[i + 1 :])) for i in range(len(types))]
    shared = [{f.name for f in dataclasses.fields(t)} & later[i] for i, t in enumerate(types)]
    parser = TrlParser([_without_fields(t, names) if names else t for t, names in zip(types, shared)])
    try:
        parsed = list(parser.parse_args_and_config(argv))
    except ValueError as e:
        if "Unknown arguments from config file" in str(e):
            raise SystemExit(f"refiner-rl: bad recipe key: {e}") from None
        raise
    for i, (t, names) in enumerate(zip(types, shared)):
        if names:  # rebuild the real dataclass (its __post_init__ checks run here) with the shared values
            values = {f.name: getattr(parsed[i], f.name) for f in dataclasses.fields(parsed[i]) if f.init}
            owner = {n: next(parsed[j] for j in range(i + 1, len(types)) if hasattr(parsed[j], n)) for n in names}
            parsed[i] = t(**values, **{n: getattr(o, n) for n, o in owner.items()})
    return tuple(parsed)


def _without_fields(cls, names: set[str]):
    """A plain dataclass with ``cls``'s fields except ``names`` (parsing only; no ``__post_init__``)."""
    keep = [
        (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for f in dataclasses.fields(cls)
        if f.name not in names and f.init
    ]
    out = dataclasses.make_dataclass(cls.__name__, keep)
    out.__module__ = cls.__module__  # string annotations resolve in the original module
    return out


def _device(config):
    from accelerate import PartialState

    return PartialState().device if not getattr(config, "use_cpu", False) else "cpu"


def sft_main(argv: list[str]) -> int:
    from transformers import set_seed

    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
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
    logger.info(
        "SFT on %d records (%d skipped); policy %s, LoRA=%s",
        len(train),
        len(train.report.skipped),
        model_args.model_name_or_path,
        model_args.use_lora,
    )
    trainer = FlowSFTTrainer(policy, config, train, eval_dataset=eval_ds)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("saved to %s", os.path.abspath(config.output_dir))
    return 0


def grpo_main(argv: list[str]) -> int:
    from transformers import set_seed

    from refiner_rl.configs import DataArguments, ModelArguments, build_policy
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
