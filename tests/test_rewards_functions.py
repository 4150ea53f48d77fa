"""Plain TRL reward functions as rewards: dotted paths, callables, PIL or tensor arguments, None, async, deadline."""

import json
import math

import pytest
import torch
from PIL import Image

from refiner_rl.cli.rewards import main
from refiner_rl.rewards.masked_pixel import MaskedPixel
from refiner_rl.scoring import FunctionReward, build_reward_funcs, score_batch
from refiner_rl.scoring.registry import RewardConfigError
from tests import scoring_functions as rf


def _grey(level: int, size: int = 4) -> torch.Tensor:
    return torch.full((3, size, size), level / 255.0)


def test_plain_function_by_dotted_path_spec_and_callable_scores_through_score_batch():
    rewards = build_reward_funcs(
        [
            {"name": "tests.scoring_functions.brightness", "scale": 2.0},
            "tests.scoring_functions:brightness",
            rf.brightness,
            "masked_pixel",
            MaskedPixel(region="outside"),
        ]
    )
    assert [type(r).__name__ for r in rewards] == ["FunctionReward"] * 3 + ["MaskedPixel"] * 2
    images = [_grey(51), _grey(0)]
    target = [_grey(51), _grey(102)]
    batch = score_batch(rewards, ["a", "b"], images, {"target": target, "index": [7, 7]})
    assert batch.labels == ["brightness", "brightness_2", "brightness_3", "masked_pixel", "masked_pixel_2"]
    nan = math.nan
    expected = torch.tensor([[0.4, 0.2, 0.2, 0.0, nan], [nan, nan, nan, -0.16, nan]])
    # masked_pixel without a mask: the whole image; outside: an empty region, so not scored (NaN, never 0)
    assert torch.allclose(batch.scores, expected, atol=1e-6, equal_nan=True)
    seen = rf.SEEN["brightness"]
    assert all(isinstance(c, Image.Image) and c.mode == "RGB" for c in seen["completions"])
    assert all(isinstance(t, Image.Image) for t in seen["target"]) and seen["index"] == [7, 7]
    assert batch.failed_frac["brightness"] == 0.5 and batch.errors == {}


def test_functions_can_ask_for_tensors_by_annotation_or_attribute():
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    image = torch.zeros(3, 4, 4)
    image[:, :, :2] = 0.5
    rewards = build_reward_funcs(["tests.scoring_functions.masked_mean", rf.prompt_length])
    assert [r.wants_tensors for r in rewards] == [True, True]
    batch = score_batch(rewards, ["four"], [image], {"mask": [Image.fromarray((mask[0] * 255).byte().numpy())]})
    assert batch.scores.tolist() == [[0.5, 4.0]]
    seen = rf.SEEN["masked_mean"]
    assert seen["completions"][0].shape == (3, 4, 4) and seen["mask"][0].shape == (1, 4, 4)
    assert torch.equal(seen["mask"][0], mask)


def test_two_async_functions_run_concurrently():
    meeting = rf.Rendezvous()
    left, right = meeting.make("left", "right", 1.0), meeting.make("right", "left", 2.0)
    rewards = build_reward_funcs([left, right, "masked_pixel"])
    assert [r.is_async for r in rewards] == [True, True, False]
    # each waits until the other has started: run one after the other, they would hang until the deadline
    batch = score_batch(rewards, ["", ""], [_grey(0)] * 2, {"target": [_grey(0)] * 2}, deadline=30)
    assert batch.scores.tolist() == [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]
    assert meeting.log[:2] == ["left start", "right start"] and sorted(meeting.log[2:]) == ["left end", "right end"]
    # called on its own (outside score_batch) an async function runs to completion too
    assert FunctionReward(rf.prompt_length)(["ab"], [_grey(0)]) == [2.0]


def test_deadline_turns_a_pending_async_reward_into_nan():
    rewards = build_reward_funcs([rf.never_answers, "masked_pixel"])
    batch = score_batch(rewards, [""], [_grey(10)], {"target": [_grey(10)]}, deadline=0.2)
    assert math.isnan(batch.scores[0, 0]) and batch.scores[0, 1] == 0.0
    assert batch.errors == {"never_answers": "TimeoutError: the batch's deadline passed before it answered"}


def test_dotted_path_errors_name_the_path():
    with pytest.raises(RewardConfigError, match=r"rewards\[0\]: cannot import reward 'mymod.brightness'"):
        build_reward_funcs(["mymod.brightness"])
    with pytest.raises(
        RewardConfigError, match="neither a subclass of refiner_rl.scoring.Reward nor a reward function"
    ):
        build_reward_funcs(["tests.scoring_functions:SEEN"])
    with pytest.raises(RewardConfigError, match="is a class; pass an instance or its name"):
        build_reward_funcs([MaskedPixel])


def test_rewards_score_cli_takes_a_function_and_recipe_weights(tmp_path, capsys):
    images = tmp_path / "samples"
    images.mkdir()
    Image.new("RGB", (4, 4), (51, 51, 51)).save(images / "a.png")
    Image.new("RGB", (4, 4), (0, 0, 0)).save(images / "b.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "rewards:\n  - {name: tests.scoring_functions.brightness, scale: 2.0}\n  - tests.scoring_functions:prompt_length\n"
        "reward_weights: [0.5, 3.0]\n"
    )
    assert main(["score", "--config", str(recipe), "--images", str(images), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["label"], r["weight"]) for r in out["rewards"]] == [("brightness", 0.5), ("prompt_length", 3.0)]
    rows = {r["image"]: r for r in out["rows"]}
    assert rows["a.png"]["scores"] == {"brightness": pytest.approx(0.4), "prompt_length": 0.0}
    assert rows["a.png"]["total"] == pytest.approx(0.2)
    # b is black: brightness cannot score it (null, left out of the total, not counted as 0)
    assert rows["b.png"]["scores"]["brightness"] is None and rows["b.png"]["total"] == 0.0
    recipe.write_text("rewards:\n  - {name: masked_pixel, weight: 1.0}\nreward_weights: [2.0]\n")
    assert main(["score", "--config", str(recipe), "--images", str(images)]) == 2
    assert "not both" in capsys.readouterr().err


def test_rewards_score_cli_passes_every_record_field_to_functions(tmp_path, capsys):
    images = tmp_path / "samples"
    images.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (4, 4), (9, 9, 9)).save(images / f"{name}.png")
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "a", "difficulty": 3}) + "\n" + json.dumps({"id": "b"}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rewards:\n  - tests.scoring_functions.difficulty\n")
    args = ["score", "--config", str(recipe), "--images", str(images), "--data", str(records), "--json"]
    assert main(args) == 0
    rows = {r["image"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["a.png"]["scores"] == {"difficulty": 3.0} and rows["b.png"]["scores"] == {"difficulty": None}
