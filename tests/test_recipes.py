"""Every shipped recipe parses with the trainer's own parser, so a recipe never rots silently."""

import glob
import os
import re

import pytest
import yaml

from refiner_rl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")) if "/accelerate/" not in p)


def _command(path: str) -> str | None:
    """The ``refiner-rl`` command the recipe's header launches it with (``sft``, ``grpo``, ``planner``...)."""
    if not os.path.isfile(path):
        return None
    name = os.path.relpath(path, ROOT)
    for line in open(path):
        m = re.search(r"refiner[-_]rl(?:\.cli\.main)? (\w+)", line)
        if m and (name in line or line.rstrip().endswith("\\")):
            return m.group(1)
    return None


# The SFT and GRPO stages' recipes; other commands' recipes (the planner's TRL GRPOTrainer) are parsed by their tests.
TRAIN_RECIPES = [p for p in ALL_RECIPES if _command(p) in ("sft", "grpo")]


def _types(path):
    from refiner_rl.configs import DataArguments, ModelArguments

    if os.path.basename(path).startswith("sft") or _command(path) == "sft":
        from refiner_rl.trainers import FlowSFTConfig

        return (ModelArguments, DataArguments, FlowSFTConfig)
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig

    return (ModelArguments, DataArguments, FlowGRPOConfig)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_names_its_command(path):
    assert _command(path) is not None, "the header gives the `refiner-rl <command> --config <this file>` line"


def test_there_are_recipes():
    names = {os.path.relpath(p, os.path.join(ROOT, "recipes")) for p in TRAIN_RECIPES}
    assert {"tiny/sft.yaml", "flux_kontext/sft.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_recipe_parses_and_documents_its_launch(path, tmp_path):
    from refiner_rl.cli.train import parse_recipe

    text = open(path).read()
    assert text.lstrip().startswith("#"), "a recipe opens with a comment"
    assert "refiner-rl" in text or "refiner_rl" in text, "the header gives the launch command"
    args = parse_recipe(
        _types(path), ["--config", path, "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    )
    raw = yaml.safe_load(text)
    model_args = args[0]
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    if "rewards" in raw:
        from refiner_rl.scoring.registry import available_rewards

        known = available_rewards()
        assert all(r["name"] in known for r in args[2].rewards)


def test_unknown_recipe_key_names_the_key(tmp_path):
    from refiner_rl.cli.train import parse_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text(open(os.path.join(ROOT, "recipes", "tiny", "sft.yaml")).read() + "\nmask_wieght: 3\n")
    with pytest.raises(ConfigError, match="unknown recipe key.*mask_wieght"):
        parse_recipe(_types("sft.yaml"), ["--config", str(bad)])


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml"))), ids=os.path.basename
)
def test_accelerate_configs_are_valid_yaml(path):
    cfg = yaml.safe_load(open(path))
    assert isinstance(cfg, dict) and "distributed_type" in cfg


def test_a_language_model_option_in_a_grpo_recipe_is_refused_by_name(tmp_path):
    from refiner_rl.cli.train import parse_recipe

    bad = tmp_path / "grpo.yaml"
    bad.write_text(open(os.path.join(ROOT, "recipes", "tiny", "grpo.yaml")).read() + "\ntemperature: 0.7\n")
    with pytest.raises(ConfigError, match="`temperature: 0.7`.*no meaning for an image policy"):
        parse_recipe(_types("grpo.yaml"), ["--config", str(bad), "--output_dir", str(tmp_path), "--bf16", "false"])
