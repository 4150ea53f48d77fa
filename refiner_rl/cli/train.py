"""``refiner-rl sft`` and ``refiner-rl grpo``: parse a recipe (TrlParser YAML + ``--key value`` overrides), build
the policy and data, train, save. One path for both stages; both run the same under ``accelerate launch``.

``--help`` is short and quick (read from the config sources, nothing heavy imported); ``--help-all`` lists every
inherited Trainer option."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys

from refiner_rl.errors import ConfigError, UserError

logger = logging.getLogger("refiner_rl")

# stage -> (config class, trainer class, what the log calls it)
STAGES = {
    "sft": ("refiner_rl.trainers.sft_config:FlowSFTConfig", "refiner_rl.trainers.sft_trainer:FlowSFTTrainer", "SFT"),
    "grpo": (
        "refiner_rl.trainers.grpo_config:FlowGRPOConfig",
        "refiner_rl.trainers.grpo_trainer:FlowGRPOTrainer",
        "GRPO",
    ),
    "refl": (
        "refiner_rl.trainers.refl_config:FlowReFLConfig",
        "refiner_rl.trainers.refl_trainer:FlowReFLTrainer",
        "ReFL",
    ),
}


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _recipe_parser(dataclass_types, prog: str | None = None):
    """TrlParser over ``dataclass_types`` that rejects abbreviated flags, raises :class:`ConfigError` instead of
    printing argparse's usage, and parses a name defined by several of the types (TrainingArguments and
    ModelArguments both define ``trust_remote_code``) as one option whose value every type receives."""
    from trl import TrlParser

    class RecipeParser(TrlParser):
        def __init__(self, types, **kwargs):
            self._seen: set[str] = set()
            super().__init__(types, **kwargs)

        def add_argument(self, *args, **kwargs):
            if any(a.lstrip("-") in self._seen for a in args if a.startswith("--")):
                return None  # the first type that defines a name parses it; the others share its value
            self._seen.update(a.lstrip("-") for a in args if a.startswith("--"))
            return super().add_argument(*args, **kwargs)

        def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **_):
            namespace, remaining = self.parse_known_args(args=args)
            values = vars(namespace)
            out = [t(**{f.name: values[f.name] for f in dataclasses.fields(t) if f.init}) for t in self.dataclass_types]
            return (*out, remaining) if return_remaining_strings else tuple(out)

        def error(self, message):
            raise ConfigError(f"{message} (see `{self.prog} --help`)")

    return RecipeParser(list(dataclass_types), prog=prog or "refiner-rl", allow_abbrev=False)


def parse_recipe(dataclass_types, argv: list[str], prog: str | None = None):
    """The dataclasses of a recipe (``--config FILE`` YAML, then ``--key value`` overrides). Every mistake (unknown
    or abbreviated key, bad value, a config's own check, a missing or malformed recipe) raises
    :class:`ConfigError` naming the key."""
    import yaml

    parser = _recipe_parser(dataclass_types, prog)
    try:
        *parsed, from_yaml, from_cli = parser.parse_args_and_config(
            list(argv), return_remaining_strings=True, separate_remaining_strings=True
        )
    except UserError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"recipe not found: {e.filename}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe is not valid YAML: {' '.join(str(e).split())}") from e
    except ValueError as e:  # the configs' __post_init__ checks
        raise ConfigError(" ".join(str(e).split())) from e
    if from_yaml:
        keys = ", ".join(k[2:] for k in from_yaml if k.startswith("--"))
        raise ConfigError(f"unknown recipe key(s) {keys}: check the spelling against `{parser.prog} --help`")
    if from_cli:
        raise ConfigError(
            f"unknown option(s) {' '.join(from_cli)}: options are spelled out in full (see `{parser.prog} --help`)"
        )
    return tuple(parsed)


def _device(config):
    from accelerate import PartialState

    return PartialState().device if not getattr(config, "use_cpu", False) else "cpu"


def _trainer(stage: str, policy, config, train, eval_ds):
    cls = _load(STAGES[stage][1])
    if stage == "sft":
        return cls(policy, args=config, train_dataset=train, eval_dataset=eval_ds)
    from refiner_rl.distributed import frozen_model_context
    from refiner_rl.scoring import build_reward_funcs

    with frozen_model_context():  # under ZeRO-3, reward models must not be partitioned
        rewards = build_reward_funcs(config.rewards)
    return cls(policy, rewards, args=config, train_dataset=train, eval_dataset=eval_ds)


def train_main(stage: str, argv: list[str]) -> int:
    """Parse, build, train, save: ``refiner-rl sft|grpo``."""
    prog = f"refiner-rl {stage}"
    if "--help-all" in argv:
        _recipe_parser(_stage_types(stage), prog).print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        from refiner_rl.cli.options import stage_help

        print(stage_help(stage))
        return 0
    from transformers import set_seed

    from refiner_rl.configs import build_policy
    from refiner_rl.distributed import frozen_model_context
    from refiner_rl.trainers.checkpoints import resolve_checkpoint

    _setup_logging()
    model_args, data_args, config = parse_recipe(_stage_types(stage), argv, prog)
    # A missing or broken checkpoint fails now, before minutes of model loading and data checks.
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:  # unset settings take the checkpoint's (refiner_rl_model.json); others must agree
        _apply_saved_settings(checkpoint, model_args, data_args)
    set_seed(config.seed)  # the LoRA's A matrices are random: every process (and every rerun) must draw the same
    with frozen_model_context():  # under ZeRO-3, the codec and text encoders must not be partitioned
        policy = build_policy(model_args, _device(config))
    multiple = policy.size_multiple
    train = data_args.build(multiple=multiple)
    eval_ds = data_args.build(multiple=multiple, eval=True)
    for ds in (train, eval_ds):  # a record with more references than the editor takes fails now, named
        if ds is not None:
            ds.check_references(getattr(policy, "max_references", 1), type(policy).__name__)
    logger.info(
        "%s on %d records (%d skipped)%s; policy %s, LoRA=%s",
        STAGES[stage][2],
        len(train),
        len(train.report.skipped),
        f", {len(eval_ds)} held-out" if eval_ds is not None else "",
        model_args.model_name_or_path,
        model_args.use_lora,
    )
    trainer = _trainer(stage, policy, config, train, eval_ds)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("saved to %s", os.path.abspath(config.output_dir))
    return 0


def _apply_saved_settings(checkpoint: str, model_args, data_args) -> None:
    from refiner_rl import model_settings

    values = model_settings.merge(
        model_settings.load(checkpoint),
        {"reference_alignment": data_args.reference_alignment, "reference_positions": model_args.reference_positions},
    )
    data_args.reference_alignment = values["reference_alignment"]
    model_args.reference_positions = values["reference_positions"]
    saved = model_settings.load(checkpoint)
    model_args.editor_options = model_settings.merge_options(saved, model_args.editor_options, "the checkpoint")


def _stage_types(stage: str) -> tuple:
    from refiner_rl.configs import DataArguments, ModelArguments

    return ModelArguments, DataArguments, _load(STAGES[stage][0])


def sft_main(argv: list[str]) -> int:
    return train_main("sft", argv)


def grpo_main(argv: list[str]) -> int:
    return train_main("grpo", argv)
