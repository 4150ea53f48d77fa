"""Registry, recipe specs, required fields, the safe call and the ZeRO-3 helper."""

import logging
import math

import pytest
import torch

from refiner_rl.errors import ConfigError
from refiner_rl.scoring import Reward, outside_zero3_init, registry, score_batch, score_safely
from refiner_rl.scoring.registry import (
    RewardConfigError,
    available_rewards,
    build_reward_funcs,
    check_required_fields,
    get_reward_class,
    register_reward,
    reward_labels,
    split_weights,
)


class _Scripted(Reward):
    """Returns whatever it is told to (not registered)."""

    name = "scripted"

    def __init__(self, values=None, fail=None, maps=None, **kwargs):
        super().__init__(**kwargs)
        self.values, self.fail, self.maps = values, fail, maps
        self.provides_maps = maps is not None

    def score(self, prompts, completions, **columns):
        if self.fail:
            raise self.fail
        return list(self.values)

    def score_maps(self, prompts, completions, **columns):
        return self.score(prompts, completions, **columns), self.maps


def test_builtins_are_registered_with_their_metadata():
    known = available_rewards()
    for name in ("masked_pixel", "patch_dreamsim", "dino_similarity"):
        assert name in known and known[name].name == name
        assert registry.reward_source(name) == "builtin"
    assert known["masked_pixel"].required_fields == ("target",)
    assert known["masked_pixel"].optional_fields == ("mask",)
    assert known["patch_dreamsim"].provides_maps is True


def test_build_reward_funcs_from_recipe_specs_weights_only_from_the_specs():
    specs, weights = split_weights(
        [
            {"name": "masked_pixel", "weight": 0.5, "error": "l1"},
            "masked_pixel",
            {"name": "refiner_rl.rewards.masked_pixel:MaskedPixel", "region": "outside", "weight": 2},
        ]
    )
    assert weights == [0.5, 1.0, 2.0]
    assert specs[0] == {"name": "masked_pixel", "error": "l1"} and specs[1] == "masked_pixel"
    rewards = build_reward_funcs(specs)
    assert [type(r).__name__ for r in rewards] == ["MaskedPixel"] * 3
    assert not any(hasattr(r, "weight") for r in rewards)  # a plug-in carries no weight
    assert rewards[0].error == "l1" and rewards[2].region == "outside"
    assert reward_labels(rewards) == ["masked_pixel", "masked_pixel_2", "masked_pixel_3"]
    plain = ["masked_pixel", {"name": "masked_pixel"}]
    assert split_weights(plain) == (plain, None)  # no entry gives a weight: the config's reward_weights apply


def test_weight_is_not_a_reward_option():
    with pytest.raises(RewardConfigError, match=r"rewards\[0\]: `weight` is the recipe's, not an option of reward"):
        build_reward_funcs([{"name": "masked_pixel", "weight": 1.0}])
    with pytest.raises(TypeError):
        get_reward_class("masked_pixel")(weight=2.0)
    with pytest.raises(ConfigError, match=r"rewards\[1\]: `weight` must be a number, got 'high'"):
        split_weights(["masked_pixel", {"name": "masked_pixel", "weight": "high"}])


def test_unknown_reward_name_lists_the_known_ones():
    with pytest.raises(RewardConfigError) as e:
        build_reward_funcs([{"name": "patch_dreamsimm"}])
    msg = str(e.value)
    assert msg.startswith("rewards[0]: unknown reward 'patch_dreamsimm'; known rewards: ")
    for name in ("masked_pixel", "patch_dreamsim", "dino_similarity"):
        assert name in msg
    with pytest.raises(RewardConfigError, match="cannot import reward 'nope.mod:Thing'"):
        get_reward_class("nope.mod:Thing")


def test_unknown_option_names_reward_key_and_accepted_options():
    with pytest.raises(RewardConfigError) as e:
        build_reward_funcs(["masked_pixel", {"name": "masked_pixel", "patchsize": 8}])
    msg = str(e.value)
    assert msg.startswith("rewards[1]: reward 'masked_pixel' has no option 'patchsize'")
    assert msg.endswith("accepted options: device, dtype, error, patch_size, region")


def test_bad_option_value_and_missing_name():
    with pytest.raises(RewardConfigError, match=r"rewards\[0\]: cannot build reward 'masked_pixel': .*'l2' or 'l1'"):
        build_reward_funcs([{"name": "masked_pixel", "error": "l3"}])
    with pytest.raises(RewardConfigError, match=r"rewards\[0\]: missing `name`"):
        build_reward_funcs([{"error": "l1"}])
    with pytest.raises(RewardConfigError, match="must be a list"):
        build_reward_funcs({"name": "masked_pixel"})


def test_required_fields_error_names_reward_and_missing_fields():
    rewards = build_reward_funcs(["masked_pixel"])
    check_required_fields(rewards, ["target", "mask"])  # fine
    check_required_fields(rewards, ["target"])  # mask is optional
    with pytest.raises(RewardConfigError) as e:
        check_required_fields(rewards, ["draft", "reference"])
    msg = str(e.value)
    assert "reward 'masked_pixel' needs target" in msg
    assert "the data provides draft, prompt, reference" in msg


def test_register_reward_rejects_nameless_and_clashing_classes():
    with pytest.raises(ValueError, match="must set a class attribute `name`"):
        register_reward(type("NoName", (Reward,), {}))
    clash = type("OtherMaskedPixel", (Reward,), {"name": "masked_pixel"})
    with pytest.raises(
        ValueError, match="reward name 'masked_pixel' is taken by refiner_rl.rewards.masked_pixel:MaskedPixel"
    ):
        register_reward(clash)
    with pytest.raises(TypeError):
        register_reward(object)


def test_score_safely_turns_exceptions_into_none():
    r = _Scripted(fail=RuntimeError("model exploded"))
    scores, maps, n_failed, err = score_safely(r, ["a", "b"], [torch.zeros(3, 2, 2)] * 2)
    assert scores == [None, None] and maps == [None, None] and n_failed == 2
    assert err == "RuntimeError: model exploded"


def test_score_batch_logs_a_failing_reward_once_per_batch(caplog):
    rewards = [_Scripted(fail=RuntimeError("model exploded")), _Scripted(values=[1.0, float("nan")])]
    with caplog.at_level(logging.WARNING):
        batch = score_batch(rewards, ["a", "b"], [torch.zeros(3, 2, 2)] * 2)
    assert batch.labels == ["scripted", "scripted_2"] and batch.errors == {"scripted": "RuntimeError: model exploded"}
    assert torch.isnan(batch.scores[:, 0]).all() and batch.scores[0, 1] == 1.0 and torch.isnan(batch.scores[1, 1])
    assert batch.failed_frac == {"scripted": 1.0, "scripted_2": 0.5}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "reward 'scripted' could not score 2 of 2 samples (RuntimeError: model exploded)",
        "reward 'scripted_2' could not score 1 of 2 samples",
    ]


def test_score_safely_cleans_nan_inf_and_wrong_lengths():
    r = _Scripted(values=[0.5, float("nan"), float("inf"), None])
    result = score_safely(r, [""] * 4, [None] * 4)
    assert result.scores == [0.5, None, None, None] and result.n_failed == 3 and result.error is None
    assert r([""] * 4, [None] * 4) == [0.5, None, None, None]  # __call__ cleans too
    short = score_safely(_Scripted(values=[1.0]), [""] * 2, [None] * 2)
    assert short.scores == [None, None] and short.n_failed == 2 and "returned 1 scores" in short.error


def test_score_safely_keeps_maps_only_where_scored():
    m = torch.tensor([[1.0, float("nan")]])
    r = _Scripted(values=[0.2, float("nan")], maps=[m, m])
    scores, maps, n_failed, _err = score_safely(r, ["", ""], [None, None])
    assert scores == [0.2, None] and n_failed == 1
    assert maps[1] is None and torch.equal(torch.isnan(maps[0]), torch.tensor([[False, True]]))
    assert maps[0][0, 0].item() == 1.0
    # score_batch stacks them per reward, NaN for the sample without a map
    batch = score_batch([r], ["", ""], [None, None], with_maps=True)
    assert batch.maps[0].shape == (2, 1, 2) and torch.isnan(batch.maps[0][1]).all() and batch.maps[0][0, 0, 0] == 1.0
    assert score_batch([r], ["", ""], [None, None]).maps == [None]


def test_outside_zero3_init_hides_and_restores_the_deepspeed_config():
    from transformers.integrations import deepspeed as hf_ds

    class FakeZero3Config:
        def is_zero3(self):
            return True

    cfg = FakeZero3Config()
    hf_ds.set_hf_deepspeed_config(cfg)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with outside_zero3_init():
            assert not hf_ds.is_deepspeed_zero3_enabled()
        assert hf_ds.is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
    with outside_zero3_init():  # no DeepSpeed: a no-op
        assert not hf_ds.is_deepspeed_zero3_enabled()


def test_clean_score_math():
    from refiner_rl.scoring import clean_score

    assert clean_score(float("nan")) is None and clean_score(math.inf) is None and clean_score("x") is None
    assert clean_score(torch.tensor(0.25)) == 0.25
