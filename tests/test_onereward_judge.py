"""OneReward judge: templates, pair records, the pairwise loss on fixed logits, the torch image path, start-up errors.

Learning, the trained judge as a reward and its server: tests/test_onereward_judge_training.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from refiner_rl.errors import ConfigError, DataError
from refiner_rl.onereward import load_pairs, load_templates, pairwise_judge_loss
from refiner_rl.onereward.synthetic import write_synthetic_pairs
from refiner_rl.vlm.questions import answer_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    from refiner_rl.vlm.tiny import build_tiny_judge

    return build_tiny_judge(tmp_path_factory.mktemp("tiny_judge"))


# -- the loss on fixed logits ----------------------------------------------------------------------------------

YES, NO = [1], [3]


def _hand(l_fwd, l_rev, prob):
    """Hand-computed per-pair loss and score from two 5-token logit rows."""

    def p(row, ids):
        z = sum(math.exp(v) for v in row) if prob == "softmax" else math.exp(row[1]) + math.exp(row[3])
        return sum(math.exp(row[i]) for i in ids) / z

    loss = -0.5 * (math.log(p(l_fwd, YES)) + math.log(p(l_rev, NO)))
    return loss, 0.5 * (p(l_fwd, YES) + 1.0 - p(l_rev, YES))


@pytest.mark.parametrize("prob", ["yes_no", "softmax"])
def test_loss_and_p_yes_match_hand_computed_values_and_use_both_orders(prob):
    fwd = [[0.0, 2.0, 0.5, -1.0, 0.3], [1.0, -0.5, 0.0, 0.5, 2.0]]
    rev = [[0.2, -1.0, 0.0, 1.5, 0.0], [0.0, 0.7, 0.1, 0.2, -0.3]]
    out = pairwise_judge_loss(torch.tensor(fwd), torch.tensor(rev), YES, NO, prob)
    for k in range(2):
        loss, score = _hand(fwd[k], rev[k], prob)
        assert out.loss[k].item() == pytest.approx(loss, rel=1e-6)
        assert out.score[k].item() == pytest.approx(score, rel=1e-6)
    # pair 0, yes_no: P(Yes | w, l) = 1 / (1 + e^-3), P(No | l, w) = 1 / (1 + e^-2.5)
    if prob == "yes_no":
        expected = -0.5 * (math.log(1 / (1 + math.exp(-3.0))) + math.log(1 / (1 + math.exp(-2.5))))
        assert out.loss[0].item() == pytest.approx(expected, rel=1e-6)
    # Both orders count: changing only the reversed chat's logits changes the loss.
    other = pairwise_judge_loss(torch.tensor(fwd), torch.tensor(fwd), YES, NO, prob)
    assert not torch.allclose(other.loss, out.loss)
    # The gradient pushes Yes up in the forward order and down in the reversed one.
    f, r = torch.tensor(fwd, requires_grad=True), torch.tensor(rev, requires_grad=True)
    pairwise_judge_loss(f, r, YES, NO, prob).loss.sum().backward()
    assert (f.grad[:, 1] < 0).all() and (r.grad[:, 1] > 0).all() and (r.grad[:, 3] < 0).all()


def test_loss_of_an_undecided_judge_is_ln2():
    logits = torch.zeros(3, 5)
    out = pairwise_judge_loss(logits, logits, YES, NO)
    assert torch.allclose(out.loss, torch.full((3,), math.log(2.0))) and torch.allclose(
        out.score, torch.full((3,), 0.5)
    )


# -- templates -------------------------------------------------------------------------------------------------


def test_default_templates_and_yaml_extension(tmp_path):
    t = load_templates(None)
    assert t.task_dimensions("fill") == ["structure", "consistency", "text_alignment", "aesthetics"]
    assert t.task_dimensions("removal") == ["removal_quality"]
    assert t.task_dimensions("refine") == ["detail_fidelity", "draft_consistency"] and t.context("refine") == [
        "reference",
        "source",
    ]
    assert "a red cup" in t.query("fill", "text_alignment", "a red cup")
    assert "a red cup" not in t.query("fill", "aesthetics", "a red cup")  # the prompt only for text alignment
    path = tmp_path / "t.yaml"
    path.write_text(
        "dimensions: {sharpness: 'sharpness: crisp edges'}\n"
        "tasks: {deblur: {description: 'deblurring', dimensions: [sharpness], context: [source]}}\n"
    )
    t = load_templates(str(path))
    assert t.task_dimensions("deblur") == ["sharpness"] and "crisp edges" in t.query("deblur", "sharpness")
    assert "fill" in t.tasks  # the defaults stay
    path.write_text("tasks: {deblur: {description: d, dimensions: [sharpness]}}\n")
    with pytest.raises(ConfigError, match="task 'deblur' names dimension 'sharpness', which has no description"):
        load_templates(str(path))
    with pytest.raises(ConfigError, match="context 'depth': use any of source, mask, reference"):
        load_templates({"tasks": {"refine": {"context": ["depth"]}}})


# -- pair records ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_synthetic_pairs(str(tmp_path_factory.mktemp("pairs")), 6, seed=3, size=16)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _write(tmp_path, path, rows):
    out = tmp_path / "bad.jsonl"
    base = str(path).rsplit("/", 1)[0]
    for row in rows:
        for key in ("image_a", "image_b", "reference", "source", "mask"):
            if isinstance(row.get(key), str) and not row[key].startswith("/"):
                row[key] = f"{base}/{row[key]}"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_b": "missing.png"}, r"record 1 \(id='pair-3-1'\) image_b: file not found: .*missing.png"),
        ({"task": "paint"}, r"record 1 \(id='pair-3-1'\): unknown task 'paint'; known: fill, extend, removal, refine"),
        ({"dimension": "sharpness"}, r"record 1 \(id='pair-3-1'\): unknown dimension 'sharpness'"),
        ({"dimension": "removal_quality"}, r"task 'refine' has no template for dimension 'removal_quality'"),
        ({"preferred": "tie"}, r"record 1 \(id='pair-3-1'\): preferred='tie' is not a preference for one image"),
        ({"reference": None}, r"task 'refine' shows the judge the 'reference' image, but the record has none"),
    ],
)
def test_bad_pair_records_name_the_record(tmp_path, pairs_file, change, message):
    rows = _rows(pairs_file)
    rows[1].update(change)
    bad = _write(tmp_path, pairs_file, rows)
    templates = load_templates(None)
    with pytest.raises(DataError, match=message):
        load_pairs(bad, templates)
    kept = load_pairs(bad, templates, skip_invalid=True)
    assert len(kept.records) == 5 and len(kept.skipped) == 1 and "pair-3-1" in kept.skipped[0]


def test_synthetic_pairs_prefer_the_objectively_better_image(pairs_file):
    import numpy as np
    from PIL import Image

    pairs = load_pairs(pairs_file, load_templates(None))
    assert {r["dimension"] for r in pairs.records} == {"detail_fidelity", "draft_consistency"}
    for r in pairs.records:
        a, b, ref, src = (
            np.asarray(Image.open(r[k]), np.float32) for k in ("image_a", "image_b", "reference", "source")
        )
        m = np.asarray(Image.open(r["mask"])) > 127
        win, lose = (a, b) if r["preferred"] == "a" else (b, a)
        if r["dimension"] == "detail_fidelity":  # closer to the reference's detail inside the mask
            assert ((win - ref)[m] ** 2).mean() < ((lose - ref)[m] ** 2).mean()
        else:  # closer to the draft outside it
            assert ((win - src)[~m] ** 2).mean() < ((lose - src)[~m] ** 2).mean()


@pytest.mark.parametrize("kind", ["detail", "noise", "shift", "swap", "degrade"])
def test_every_synthetic_kind_prefers_the_image_closer_to_the_reference_in_a_balanced_order(kind):
    import numpy as np

    from refiner_rl.onereward.synthetic import synthetic_pairs

    pairs = synthetic_pairs(8, seed=4, size=16, dimensions=("detail_fidelity",), kind=kind, region=0.75)
    preferred = [r["preferred"] for r in pairs]
    if kind in ("shift", "swap"):  # twins: the same images A and B, each preferred once (the reference differs)
        assert all({preferred[i], preferred[i + 1]} == {"a", "b"} for i in range(0, 8, 2))
        for r, twin in zip(pairs[::2], pairs[1::2]):
            assert (
                all(r[k] is twin[k] for k in ("image_a", "image_b", "source")) and r["reference"] != twin["reference"]
            )
    else:
        assert preferred == ["a", "b"] * 4  # the winner is image A in half of the pairs
    for r in pairs:
        a, b, ref, src = (np.asarray(r[k], np.float32) for k in ("image_a", "image_b", "reference", "source"))
        m = np.asarray(r["mask"]) > 127
        win, lose = (a, b) if r["preferred"] == "a" else (b, a)
        assert ((win - ref)[m] ** 2).mean() < ((lose - ref)[m] ** 2).mean()  # inside the mask: closer
        assert (win[~m] == src[~m]).all() and (lose[~m] == src[~m]).all()  # outside: both the draft
    with pytest.raises(ConfigError, match="kind 'blur': use one of detail, shift, noise, swap, degrade"):
        synthetic_pairs(2, kind="blur")


# -- start-up errors and the torch image path ------------------------------------------------------------------


def test_tokenizer_without_single_yes_no_tokens_fails_at_start_up(tiny_judge_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_judge_dir)
    assert answer_token_ids(tok, ["Yes", " Yes"], ["No", " No"], "x") == (
        tok.convert_tokens_to_ids(["Yes", "ĠYes"]),
        tok.convert_tokens_to_ids(["No", "ĠNo"]),
    )
    with pytest.raises(
        ConfigError, match=r"the tokenizer of tiny has no single-token id for some of yes_words=\['Yes please'\]"
    ):
        answer_token_ids(tok, ["Yes please"], ["No"], "tiny")
    with pytest.raises(ConfigError, match="or they overlap"):
        answer_token_ids(tok, ["Yes"], ["Yes"], "tiny")


@pytest.mark.parametrize("size", [(3, 40, 70), (3, 56, 84)])
def test_torch_image_path_equals_the_processor(tiny_judge_dir, size):
    from refiner_rl.scoring.base import to_pil
    from refiner_rl.vlm import LocalVLM, build_conversation

    vlm = LocalVLM.shared(tiny_judge_dir, min_pixels=56 * 56, max_pixels=4 * 56 * 56)
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(size, generator=g) * 255).round() / 255 for _ in range(2)]
    ref = vlm.encode([build_conversation("q", [to_pil(x) for x in images], context=[("Reference", to_pil(images[0]))])])
    ours = vlm.encode_tensors([build_conversation("q", images, context=[("Reference", images[0])])])
    assert set(ref) == set(ours)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ref[key], ours[key])
    # Exact without a resize; with one, the processor rounds each resize pass to uint8 (<= ~1 grey level).
    tol = 1e-5 if size[1:] == (56, 84) else 1.5 / 255 / min(vlm.processor.image_processor.image_std)
    assert torch.allclose(ours["pixel_values"], ref["pixel_values"], atol=tol)


@pytest.mark.parametrize("name", ["judge.yaml", "judge_tiny.yaml", "judge_reference_tiny.yaml"])
def test_recipes_parse(name):
    import os

    from trl import ModelConfig

    from refiner_rl.cli.train import parse_recipe
    from refiner_rl.onereward.config import JudgeConfig, JudgeDataArguments

    root = os.path.join(os.path.dirname(__file__), "..")
    path = os.path.join(root, "recipes", "onereward", name)
    assert open(path).read().startswith("# OneReward")  # the header gives the command line
    data, config, model = parse_recipe(
        (JudgeDataArguments, JudgeConfig, ModelConfig), ["--config", path, "--use_cpu", "true", "--bf16", "false"]
    )
    if name == "judge.yaml":  # the paper's batch (16 pairs over 8 GPUs) and learning rate
        assert config.learning_rate == 1e-6 and config.per_device_train_batch_size * 8 == 16
        assert model.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    else:
        assert model.model_name_or_path == "tiny" and load_templates(os.path.join(root, data.templates)).template


def test_lora_judge_trains_and_saves_a_plain_checkpoint_vlm_judge_loads(tiny_judge_dir, pairs_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from trl import ModelConfig

    from refiner_rl.onereward.cli import load_model, save_judge
    from refiner_rl.onereward.config import JudgeConfig
    from refiner_rl.onereward.trainer import JudgeTrainer
    from refiner_rl.rewards.vlm_judge import VLMJudge

    templates = load_templates(None)
    pairs = load_pairs(pairs_file, templates)
    config = JudgeConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        min_pixels=3136,
        max_pixels=3136,
        disable_tqdm=True,
    )
    model, processor = load_model(tiny_judge_dir, ModelConfig(model_name_or_path=tiny_judge_dir), config)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = JudgeTrainer(lora, config, templates, processor, pairs.to_dataset(), pairs.to_dataset())
    first = trainer.evaluate()
    trainer.train()
    assert trainer.evaluate()["eval_loss"] != first["eval_loss"]  # the adapter moved
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and {"accuracy", "margin", "mean_reward"} <= set(logged[0])  # named like TRL's RewardTrainer
    save_judge(trainer, processor, templates, config)
    assert not any(name.startswith("adapter") for name in os.listdir(tmp_path))  # merged into the weights
    judge = VLMJudge(backend="local", model_name_or_path=str(tmp_path))
    assert judge.dimensions == ["detail_fidelity", "draft_consistency"] and judge.context == ["reference", "source"]
    g = torch.Generator().manual_seed(0)
    sample, draft, ref = (torch.rand(3, 16, 16, generator=g) for _ in range(3))
    (score,) = judge(["p"], [sample], draft=[draft], reference=[ref])
    assert 0.0 < score < 1.0
