"""Differentiable rewards: ``score_tensors`` equals ``score`` and its gradient reaches the images; the trainer's
refusal of a reward that is not differentiable."""

import math

import pytest
import torch

from refiner_rl.errors import ConfigError
from refiner_rl.rewards.dino_similarity import DinoSimilarity
from refiner_rl.rewards.masked_pixel import MaskedPixel
from refiner_rl.rewards.patch_dreamsim import PatchDreamSim
from refiner_rl.scoring.base import Reward
from tests.dreamsim_cache import make_random_dreamsim_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g)
    target = torch.rand(n, 3, h, w, generator=g)
    mask = torch.zeros(n, 1, h, w)
    mask[0, :, 4:12, 8:20] = 1.0
    mask[1, :, 10:30, 0:16] = 0.5  # soft
    # sample 2: empty mask -> cannot be scored inside the mask
    return images, {"target": list(target), "mask": list(mask), "reference": list(target.flip(-1))}


def _check(reward: Reward, atol: float):
    images, columns = _batch()
    expected = reward.score([""] * 3, list(images), **columns)
    x = images.clone().requires_grad_(True)
    got = reward.score_tensors(x, columns)
    assert got.shape == (3,)
    for e, g in zip(expected, got.tolist()):
        assert (e is None and math.isnan(g)) or abs(e - g) <= atol, (expected, got)
    scored = ~torch.isnan(got)
    got[scored].sum().backward()
    assert x.grad is not None and x.grad[scored].abs().sum() > 0
    assert x.grad[~scored].abs().sum() == 0  # an unscored sample gets no gradient
    return got.detach()


@pytest.mark.parametrize("error,region", [("l2", "inside"), ("l1", "inside"), ("l2", "outside")])
def test_masked_pixel_tensor_path_equals_score_and_has_the_hand_gradient(error, region):
    got = _check(MaskedPixel(error=error, region=region), atol=1e-6)
    if region == "inside":
        assert math.isnan(got[2])
    # hand-computed gradient of the l2 score of one pixel region: d/dx -(sum M (x-gt)^2 / 3) / sum M
    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    m = torch.zeros(1, 1, 4, 4)
    m[..., 0, 0] = 1
    r = MaskedPixel().score_tensors(x, {"target": torch.ones(1, 3, 4, 4), "mask": m})
    assert r.item() == pytest.approx(-1.0)
    r.sum().backward()
    expected = torch.zeros(1, 3, 4, 4)
    expected[..., 0, 0] = 2.0 / 3.0  # -2 (x - gt) / 3 with x = 0, gt = 1
    torch.testing.assert_close(x.grad, expected)


def test_masked_pixel_tensor_path_names_a_missing_column():
    with pytest.raises(ValueError, match="'masked_pixel'.*no 'target' column"):
        MaskedPixel().score_tensors(torch.rand(1, 3, 8, 8), {"mask": torch.ones(1, 1, 8, 8)})


@pytest.mark.parametrize("region,pooling", [("bbox", "cls"), ("full", "mean")])
def test_dino_similarity_tensor_path_equals_score(region, pooling):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56)
    reward = DinoSimilarity(model=Dinov2Model(cfg), image_size=56, region=region, pooling=pooling, dilation=2)
    assert reward.differentiable
    got = _check(reward, atol=1e-5)
    assert math.isnan(got[2]) == (region == "bbox")


def test_patch_dreamsim_tensor_path_equals_score(tmp_path):
    cache = make_random_dreamsim_cache(tmp_path / "dreamsim", seed=0, depth=12)
    reward = PatchDreamSim(cache_dir=cache, patch_size=16, selection="bbox", dilation=0, aggregate="area")
    assert reward.differentiable
    got = _check(reward, atol=1e-5)
    assert math.isnan(got[2])


def test_rewards_are_not_differentiable_by_default():
    class Plain(Reward):
        name = "plain"

        def score(self, prompts, completions, **columns):
            return [0.0] * len(completions)

    assert not Plain.differentiable
    with pytest.raises(NotImplementedError, match="'plain' is not differentiable"):
        Plain().score_tensors(torch.rand(1, 3, 8, 8), {})


def test_refl_trainer_refuses_a_reward_that_is_not_differentiable(tmp_path):
    from refiner_rl.trainers.refl_config import FlowReFLConfig
    from refiner_rl.trainers.refl_trainer import FlowReFLTrainer
    from tests.helpers import small_policy

    def brightness(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    args = FlowReFLConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ConfigError, match="reward 'brightness' is not differentiable"):
        FlowReFLTrainer(small_policy(lora=True), [{"name": "masked_pixel"}, brightness], args=args)
