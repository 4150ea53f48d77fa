"""The tiny judge that compares with the reference (recipes/onereward/judge_reference_tiny.yaml): one judge, trained
once per module through `refiner-rl reward-model` on a mix of `swap`, `shift` (twins: only the reference tells which
image wins) and `degrade` pairs (the data build's degradations at two strengths), then held-out accuracy per kind,
before (the random tiny-init judge) and after. The control, a judge that sees no reference, is checked exactly: the
held-out twins ask each question without the reference twice with opposite answers.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import numpy as np
import pytest
import torch

from refiner_rl.cli.main import main as cli_main
from refiner_rl.onereward.synthetic import synthetic_pairs
from tests.helpers import LEARNING_SEED, data_seeds, learning_figure

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "onereward")
RECIPE = os.path.join(RECIPES, "judge_reference_tiny.yaml")
TEMPLATES = os.path.join(RECIPES, "reference_tiny_templates.yaml")
KINDS = ("swap", "shift", "degrade")
HELD_OUT = 48  # pairs per kind


def held_out(kind: str) -> list[dict]:
    return synthetic_pairs(HELD_OUT, seed=data_seeds()[1], kind=kind, dimensions=("detail_fidelity",), region=0.75)


@torch.no_grad()
def accuracy(folder: str, templates, records: list[dict], pixels: int) -> float:
    """Held-out pairwise accuracy (order-averaged score > 1/2) of the judge in ``folder``, asked with ``templates``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from refiner_rl.onereward.collator import PairCollator
    from refiner_rl.onereward.loss import pairwise_judge_loss
    from refiner_rl.vlm.questions import answer_token_ids

    processor = AutoProcessor.from_pretrained(folder, size={"shortest_edge": pixels, "longest_edge": pixels})
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    yes, no = answer_token_ids(processor.tokenizer, ["Yes", " Yes"], ["No", " No"], folder)
    collate, right = PairCollator(processor, templates), []
    for i in range(0, len(records), 16):
        batch = collate(records[i : i + 16])
        n = len(batch.pop("groups"))
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        right += (pairwise_judge_loss(logits[:n], logits[n:], yes, no).score > 0.5).tolist()
    return sum(right) / len(right)


@pytest.fixture(scope="session")
def judge(tmp_path_factory):
    """``(trained folder, tiny-init folder)`` of the recipe, trained once for the module."""
    out = tmp_path_factory.mktemp("reference-judge")
    argv = ["reward-model", "--config", RECIPE, "--output_dir", str(out), "--seed", str(LEARNING_SEED)]
    argv += ["--synthetic_seed", str(data_seeds()[0]), "--eval_dataset", "", "--disable_tqdm", "true"]
    assert cli_main(argv) == 0
    return str(out), str(out / "tiny-init")


@pytest.mark.parametrize("kind", KINDS)
def test_judge_learns_each_kind_on_held_out_pairs(judge, kind):
    from refiner_rl.onereward.templates import load_templates

    trained, init = judge
    templates = load_templates(trained)  # as saved with the judge: view interleave
    assert templates.view("refine") == "interleave" and templates.context("refine") == []
    records = held_out(kind)
    before, after = (accuracy(folder, templates, records, 2048) for folder in (init, trained))
    print(f"{kind}: held-out accuracy {before:.3f} -> {after:.3f} ({len(records)} pairs)")
    if kind != "degrade":  # a random judge may already lean to the smoother image (seed 3: 0.667 on degrade)
        learning_figure(f"reference judge, {kind}: held-out accuracy before training", before, "<=", 0.65)
    learning_figure(f"reference judge, {kind}: held-out accuracy after training", after, ">=", 0.8)


def _key(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("kind", ["swap", "shift"])
def test_without_the_reference_the_held_out_twins_are_a_coin_toss(kind, tmp_path):
    """Exact: each question without the reference (images A and B in either order, source, mask, prompt) has as
    many records where the one image wins as where the other does, so any judge that sees no reference scores 1/2."""
    from refiner_rl.onereward.templates import load_templates
    from refiner_rl.vlm.tiny import build_tiny_judge

    records = held_out(kind)
    wins = Counter()
    for r in records:
        a, b = _key(r["image_a"]), _key(r["image_b"])
        question = (frozenset((a, b)), _key(r["source"]), _key(r["mask"]), r["prompt"], r["dimension"])
        wins[question, a if r["preferred"] == "a" else b] += 1
    for (question, winner), count in wins.items():
        (loser,) = set(question[0]) - {winner}
        assert wins[question, loser] == count, f"{kind}: a question without the reference is not balanced"
    # The reference does decide: inside the mask the winner equals it, the loser does not.
    for r in records:
        m = np.asarray(r["mask"]) > 127
        win, lose = (r["image_a"], r["image_b"]) if r["preferred"] == "a" else (r["image_b"], r["image_a"])
        ref = np.asarray(r["reference"])
        assert (np.asarray(win)[m] == ref[m]).all() and (np.asarray(lose)[m] != ref[m]).any()
    # A random judge asked without the reference (images A, B and the source) is right on exactly half.
    folder = build_tiny_judge(tmp_path / "judge", seed=LEARNING_SEED, patch_size=4, pixels=1024, vision_init_std=0.15)
    plain = load_templates(
        {
            "template": "{task} {dimension}: is Image A better than Image B?",
            "tasks": {"refine": {"context": ["source"]}},
        }
    )
    assert accuracy(folder, plain, records, 1024) == 0.5


def test_views_show_each_candidate_with_the_reference_and_bad_views_name_the_task():
    from PIL import Image

    from refiner_rl.errors import ConfigError
    from refiner_rl.onereward.collator import judge_conversation, with_reference
    from refiner_rl.onereward.templates import load_templates

    c, r = (np.random.default_rng(s).integers(0, 256, (4, 6, 3), dtype=np.uint8) for s in (0, 1))
    rows = np.asarray(with_reference(Image.fromarray(c), Image.fromarray(r), "interleave"))
    assert rows.shape == (8, 6, 3) and (rows[0::2] == c).all() and (rows[1::2] == r).all()
    side = np.asarray(with_reference(Image.fromarray(c), Image.fromarray(r), "beside"))
    assert side.shape == (4, 12, 3) and (side[:, :6] == c).all() and (side[:, 6:] == r).all()
    templates = load_templates({"tasks": {"refine": {"context": [], "view": "interleave"}}})
    assert templates.needs("refine") == ["reference"]
    chat = judge_conversation(
        templates,
        "refine",
        "detail_fidelity",
        Image.fromarray(c),
        Image.fromarray(r),
        {"reference": Image.fromarray(r)},
    )
    images = [p["image"] for p in chat[-1]["content"] if p["type"] == "image"]
    assert [np.asarray(x).shape for x in images] == [(8, 6, 3)] * 2  # A and B only, each with the reference
    with pytest.raises(ConfigError, match="task 'refine' view 'stacked': use one of separate, beside, interleave"):
        load_templates({"tasks": {"refine": {"view": "stacked"}}})
    # on tensors (the differentiable judge) the same pixels, and the gradient reaches the candidate only
    ct = torch.tensor(c, dtype=torch.float32).permute(2, 0, 1).div(255).requires_grad_(True)
    rt = torch.tensor(r, dtype=torch.float32).permute(2, 0, 1).div(255)
    for layout, pil in (("interleave", rows), ("beside", side)):
        out = with_reference(ct, rt, layout)
        assert torch.equal((out * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(pil.copy()))
    with_reference(ct, rt, "interleave").sum().backward()
    assert torch.equal(ct.grad, torch.ones_like(ct))


def test_the_vlm_judge_reward_asks_as_trained_and_is_differentiable(judge):
    """`vlm_judge` on the trained folder reads `view: interleave` from onereward.json: it needs the reference column,
    ranks held-out twins as the judge was trained to (the preferred image as the sample, the other as the draft), and
    score_tensors gives the same numbers with a gradient that reaches the sample's pixels."""
    from refiner_rl.data.images import to_tensor
    from refiner_rl.scoring import build_reward_funcs, score_batch

    (reward,) = build_reward_funcs([{"name": "vlm_judge", "model_name_or_path": judge[0], "both_orders": True}])
    assert reward.view == "interleave" and reward.context == [] and reward.required_fields == ("draft", "reference")
    records = held_out("swap")[:16] + held_out("shift")[:16]
    win = [r["image_a"] if r["preferred"] == "a" else r["image_b"] for r in records]
    lose = [r["image_b"] if r["preferred"] == "a" else r["image_a"] for r in records]
    cols = {
        "prompt": [r["prompt"] for r in records],
        "draft": [to_tensor(x.convert("RGB")) for x in lose],
        "reference": [to_tensor(r["reference"].convert("RGB")) for r in records],
    }
    samples = torch.stack([to_tensor(x.convert("RGB")) for x in win])
    batch = score_batch([reward], cols["prompt"], list(samples), cols)
    assert not batch.errors
    right = float((batch.scores[:, 0] > 0.5).float().mean())
    learning_figure("reference judge as the vlm_judge reward: held-out twins ranked right", right, ">=", 0.8)
    images = samples.clone().requires_grad_(True)
    tensors = {k: torch.stack(v) if k != "prompt" else v for k, v in cols.items()}
    t = reward.score_tensors(images, tensors)
    assert torch.allclose(t.detach(), batch.scores[:, 0].float(), atol=2e-3)
    t.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="view: interleave.*`reference` column"):
        reward(cols["prompt"], list(samples), draft=cols["draft"])
