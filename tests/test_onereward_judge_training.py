"""OneReward judge training end to end: `refiner-rl reward-model` on the tiny recipe (random tiny Qwen2.5-VL,
synthetic refinement pairs where the preferred image is objectively better), then the saved judge as the
``vlm_judge`` reward (local, differentiable, and over the OpenAI-compatible server). The trained judge is made once
per session (:func:`trained_tiny_judge`) and shared with the ReFL test that learns from it (tests/test_refl_judge.py).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from refiner_rl.cli.main import main as cli_main
from tests.helpers import LEARNING_SEED, learning_figure

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "onereward")
RECIPE, TEMPLATES = os.path.join(RECIPES, "judge_tiny.yaml"), os.path.join(RECIPES, "tiny_templates.yaml")


def trained_tiny_judge(tmp_path_factory) -> str:
    """The judge of the tiny recipe (300 steps), trained once per test session; its folder."""
    out = tmp_path_factory.getbasetemp() / "trained-tiny-judge"
    if not (out / "trainer_state.json").is_file():  # written last
        argv = ["reward-model", "--config", RECIPE, "--templates", TEMPLATES, "--output_dir", str(out)]
        argv += ["--seed", str(LEARNING_SEED), "--synthetic_seed", str(2 * LEARNING_SEED)]
        assert cli_main([*argv, "--disable_tqdm", "true"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def trained_judge(tmp_path_factory):
    out = trained_tiny_judge(tmp_path_factory)
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    evals = [h for h in history if "eval_accuracy" in h]
    return out, evals[0], evals[-1], [h for h in history if "loss" in h and "accuracy" in h]


def test_judge_learns_the_preferences_well_above_chance_on_held_out_pairs(trained_judge):
    out, before, after, train = trained_judge
    print(
        f"pairwise accuracy: held-out before {before['eval_accuracy']:.3f}, after {after['eval_accuracy']:.3f} "
        f"(loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}); training (last log) {train[-1]['accuracy']:.3f}"
    )
    # 64 held-out pairs, the preferred image first in half of them; a pair counts as right when the order-averaged
    # score 1/2 [P(Yes | winner, loser) + 1 - P(Yes | loser, winner)] > 1/2, so reading the order alone scores 0.
    assert before["step"] == 0 and after["step"] == 300
    learning_figure("judge: held-out accuracy before training", before["eval_accuracy"], "<=", 0.7)
    learning_figure("judge: held-out accuracy after training", after["eval_accuracy"], ">=", 0.78)
    learning_figure("judge: held-out loss after training", after["eval_loss"], "<", 0.45)
    assert train[-1]["loss"] < math.log(2)
    assert after["eval_accuracy/refine/detail_fidelity"] == after["eval_accuracy"]  # the tiny recipe's one dimension
    table = open(os.path.join(out, "judge_accuracy.md")).read()
    assert f"| refine | detail_fidelity | 64 | {after['eval_accuracy']:.3f} |" in table
    held_out = [json.loads(line) for line in open(os.path.join(out, "synthetic-eval", "pairs.jsonl"))]
    assert sum(r["preferred"] == "a" for r in held_out) == len(held_out) // 2
    saved = json.load(open(os.path.join(out, "onereward.json")))
    assert saved["tasks"]["refine"]["context"] == [] and saved["yes_words"] == ["Yes", " Yes"]


def _columns(n, seed=5):
    from refiner_rl.data.images import to_tensor
    from refiner_rl.data.synthetic import synthetic_records

    recs = synthetic_records(n, seed=seed, size=32)
    return {k: [to_tensor(r[k].convert("RGB")) for r in recs] for k in ("draft", "reference", "target")} | {
        "prompt": [r["prompt"] for r in recs]
    }


def test_trained_judge_is_a_grpo_reward_and_differentiable(trained_judge):
    from refiner_rl.scoring import build_reward_funcs, score_batch

    out = trained_judge[0]
    (judge,) = build_reward_funcs([{"name": "vlm_judge", "model_name_or_path": out, "both_orders": True}])
    # The saved templates are what it asks: the tiny recipe's dimension, on images A and B alone.
    assert judge.dimensions == ["detail_fidelity"] and judge.context == []
    assert judge.required_fields == ("draft",) and judge.differentiable
    cols = _columns(4)
    batch = score_batch([judge], cols["prompt"], cols["target"], cols)
    assert not batch.errors and torch.isfinite(batch.scores).all()
    assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
    # score_tensors: the same numbers (the processor path rounds to uint8), and P(Yes) reaches the pixels.
    images = torch.stack(cols["target"]).requires_grad_(True)
    t = judge.score_tensors(images, {**cols, "draft": torch.stack(cols["draft"])})
    assert torch.allclose(t.detach(), batch.scores[:, 0].float(), atol=2e-3)
    t.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # compare_to: baseline (the ReFL reference policy's image), as the reward-gradient trainer calls it.
    refl = build_reward_funcs([{"name": "vlm_judge", "model_name_or_path": out, "compare_to": "baseline"}])[0]
    s = refl.score_tensors(images, {**cols, "baseline": torch.stack(cols["draft"]).detach()})
    assert s.shape == (4,) and torch.isfinite(s).all()


def test_trained_judge_served_over_http_matches_local(trained_judge):
    from refiner_rl.rewards.vlm_judge import VLMJudge
    from refiner_rl.vlm.client import forget_servers
    from refiner_rl.vlm.server import JudgeServer

    out = trained_judge[0]
    local = VLMJudge(backend="local", model_name_or_path=out)
    cols = _columns(2, seed=6)
    with JudgeServer(local.vlm, served_model_name="judge") as server:
        forget_servers()
        remote = VLMJudge(backend="server", base_url=server.url, judge_config=out, top_logprobs=300, max_retries=0)
        assert remote.dimensions == local.dimensions and remote.context == local.context
        got = remote(cols["prompt"], cols["target"], **cols)
    assert got == pytest.approx(local(cols["prompt"], cols["target"], **cols), abs=1e-4)
    forget_servers()


def test_bad_record_stops_the_command_with_one_line(tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps(
            {
                "image_a": "a.png",
                "image_b": "b.png",
                "task": "refine",
                "dimension": "detail_fidelity",
                "preferred": "a",
                "reference": "r.png",
                "id": "p0",
            }
        )
        + "\n"
    )
    argv = ["reward-model", "--config", RECIPE, "--templates", TEMPLATES, "--dataset", str(tmp_path)]
    code = cli_main([*argv, "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "record 0 (id='p0') image_a: file not found" in err and len(err.strip().splitlines()) == 1
