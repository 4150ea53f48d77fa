"""Every shipped recipe parses with the trainer's own parser, so a recipe never rots silently."""

import glob
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")) if "/accelerate/" not in p)


def _types(path):
    from refiner_rl.configs import DataArguments, ModelArguments

    if os.path.basename(path).startswith("sft"):
        from refiner_rl.trainers import FlowSFTConfig

        return (ModelArguments, DataArguments, FlowSFTConfig)
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig

    return (ModelArguments, DataArguments, FlowGRPOConfig)


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
    with pytest.raises(SystemExit, match="mask_wieght"):
        parse_recipe(_types("sft.yaml"), ["--config", str(bad)])


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml"))), ids=os.path.basename
)
def test_accelerate_configs_are_valid_yaml(path):
    cfg = yaml.safe_load(open(path))
    assert isinstance(cfg, dict) and "distributed_type" in cfg
