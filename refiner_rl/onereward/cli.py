"""``refiner-rl reward-model``: train the OneReward judge on preference pairs.

The recipe is parsed by ``trl.TrlParser`` over ``(JudgeDataArguments, JudgeConfig, trl.ModelConfig)``; LoRA is
``trl.get_peft_config(model_config)`` applied with peft. ``model_name_or_path: tiny`` builds the tiny random
Qwen2.5-VL (:func:`refiner_rl.vlm.tiny.build_tiny_judge`) into ``{output_dir}/tiny-init``; ``dataset: synthetic``
writes the synthetic preference set (:mod:`refiner_rl.onereward.synthetic`).

The output folder holds the judge (a LoRA is merged into the weights), its processor and ``onereward.json`` (the
templates and answer words), so it loads as is into the ``vlm_judge`` reward (``model_name_or_path``: the
folder) and into ``python -m refiner_rl.vlm.server --model`` (or vLLM/SGLang).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("refiner_rl")


def load_pair_sets(args, templates, output_dir: str):
    """``(train PairSet, eval PairSet | None)`` named by the data arguments."""
    from refiner_rl.onereward.pairs import load_pairs
    from refiner_rl.onereward.synthetic import SYNTHETIC_DIMENSIONS, write_synthetic_pairs

    def one(source, eval_: bool):
        if source == "synthetic":
            n = args.synthetic_eval_pairs if eval_ else args.synthetic_pairs
            folder = os.path.join(output_dir, "synthetic-eval" if eval_ else "synthetic")
            dims = [d for d in templates.task_dimensions("refine") if d in SYNTHETIC_DIMENSIONS]
            source = write_synthetic_pairs(
                folder,
                n,
                seed=args.synthetic_seed + int(eval_),
                size=args.synthetic_size,
                dimensions=dims,
                kind=args.synthetic_kind,
                region=args.synthetic_region,
            )
        return load_pairs(source, templates, skip_invalid=args.skip_invalid_records)

    train = one(args.dataset, False)
    return train, (one(args.eval_dataset, True) if args.eval_dataset else None)


def load_model(model_path: str, model_args, config):
    """``(model, processor)``: ``AutoModelForImageTextToText`` and ``AutoProcessor`` (with the pixel budget)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from refiner_rl.errors import CheckpointError

    size = {k: v for k, v in (("shortest_edge", config.min_pixels), ("longest_edge", config.max_pixels)) if v}
    try:
        processor = AutoProcessor.from_pretrained(
            model_path, trust_remote_code=config.trust_remote_code, **({"size": size} if size else {})
        )
        model = AutoModelForImageTextToText.from_pretrained(
            model_path,
            revision=model_args.model_revision,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype),
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot load a VLM from model_name_or_path={model_path!r} ({' '.join(str(err).split())[:300]}); use a "
            "local folder with config, safetensors weights and processor files, or `tiny`"
        ) from err
    return model, processor


def save_judge(trainer, processor, templates, config) -> str:
    """Write the judge (LoRA merged), processor and templates to ``config.output_dir``."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # peft: one plain checkpoint every loader reads
        model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(config.output_dir)
        processor.save_pretrained(config.output_dir)
        templates.save(config.output_dir, yes_words=config.yes_words, no_words=config.no_words, prob=config.prob)
    return config.output_dir


def main(argv: list[str]) -> int:
    from trl import ModelConfig, get_peft_config

    from refiner_rl.cli.train import _setup_logging, parse_recipe
    from refiner_rl.errors import ConfigError
    from refiner_rl.onereward.config import JudgeConfig, JudgeDataArguments
    from refiner_rl.onereward.templates import load_templates
    from refiner_rl.onereward.trainer import JudgeTrainer
    from refiner_rl.vlm.tiny import build_tiny_judge

    _setup_logging()
    args, config, model_args = parse_recipe(
        (JudgeDataArguments, JudgeConfig, ModelConfig), argv, prog="refiner-rl reward-model"
    )
    if not model_args.model_name_or_path:
        raise ConfigError(
            "reward-model: set `model_name_or_path` (a VLM folder, e.g. Qwen2.5-VL-7B-Instruct, or `tiny`)"
        )
    templates = load_templates(args.templates)
    train, held_out = load_pair_sets(args, templates, config.output_dir)  # bad records stop us before the model
    model_path = model_args.model_name_or_path
    if model_path == "tiny":
        tiny = {"patch_size": config.tiny_patch_size, "vision_init_std": config.tiny_vision_init_std}
        if config.max_pixels:
            tiny["pixels"] = config.max_pixels
        model_path = build_tiny_judge(os.path.join(config.output_dir, "tiny-init"), seed=config.seed, **tiny)
    model, processor = load_model(model_path, model_args, config)
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    trainer = JudgeTrainer(
        model,
        args=config,
        templates=templates,
        processing_class=processor,
        train_dataset=train.to_dataset(),
        eval_dataset=held_out.to_dataset() if held_out else None,
    )
    logger.info(
        "judge training on %d pairs (%d skipped), %d held out",
        len(train.records),
        len(train.skipped),
        len(held_out.records) if held_out else 0,
    )
    start = trainer.evaluate() if held_out is not None else None  # the starting accuracy, for comparison
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if held_out is not None:
        trainer.evaluate()
        trainer.state.log_history.insert(0, {**start, "step": 0})  # train() starts a fresh state: keep it
    save_judge(trainer, processor, templates, config)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("judge saved to %s", os.path.abspath(config.output_dir))
    return 0
