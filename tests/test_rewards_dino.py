"""dino_similarity with a tiny random Dinov2Model saved with save_pretrained and loaded from the folder."""

import pytest
import torch
import torch.nn.functional as F

from refiner_rl.errors import CheckpointError
from refiner_rl.rewards.dino_similarity import IMAGENET_MEAN, IMAGENET_STD, DinoSimilarity
from refiner_rl.scoring import build_reward_funcs, score_safely

SIZE = 56  # 4 x 4 tokens of 14 px: small and fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=SIZE,
        patch_size=14,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dinov2_tiny")
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward(model_dir):
    return DinoSimilarity(model_name_or_path=model_dir, image_size=SIZE, region="full")


def _img(seed, h=40, w=48):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _manual_cls(model, image):
    x = F.interpolate(image[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).pooler_output[0]


def test_loads_from_a_local_folder_frozen_and_in_eval(reward, model_dir):
    import os

    assert os.path.exists(os.path.join(model_dir, "model.safetensors"))
    assert type(reward.model).__name__ == "Dinov2Model"
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    (built,) = build_reward_funcs([{"name": "dino_similarity", "model_name_or_path": model_dir, "image_size": SIZE}])
    assert built.required_fields == ("target",) and type(built.model).__name__ == "Dinov2Model"


def test_identical_is_one_and_value_matches_a_manual_cls_cosine(reward):
    x, y = _img(0), _img(1)
    scores, maps = reward.score_maps(["", ""], [x, y], target=[x.clone(), x])
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    expected = F.cosine_similarity(_manual_cls(reward.model, y), _manual_cls(reward.model, x), dim=0).item()
    assert scores[1] == pytest.approx(expected, abs=1e-5) and expected < 0.9999
    assert maps[0].shape == (4, 4) and maps[0].sub(1).abs().max() < 1e-5
    assert maps[1].shape == (4, 4) and maps[1].min() < 0.99


def test_bbox_region_ignores_changes_outside_the_dilated_box(model_dir):
    r = DinoSimilarity(model_name_or_path=model_dir, image_size=SIZE, region="bbox", dilation=2)
    assert r.provides_maps is False
    x = _img(2)
    m = torch.zeros(1, 40, 48)
    m[:, 10:20, 10:20] = 1
    y = x.clone()
    y[:, 30:, 30:] = 1.0 - y[:, 30:, 30:]  # far outside the box (8..22)
    scores, maps = r.score_maps([""], [y], target=[x], mask=[m])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and maps == [None]
    assert DinoSimilarity(model=r.model, image_size=SIZE, region="full")([""], [y], target=[x])[0] < 0.9999
    y2 = x.clone()
    y2[:, 12:18, 12:18] = 0.0  # inside the box
    assert r([""], [y2], target=[x], mask=[m])[0] < 0.9999
    assert r([""], [y2], target=[x], mask=[torch.zeros(1, 40, 48)]) == [None]


def test_mean_pooling_reference_and_errors(model_dir, reward):
    r = DinoSimilarity(model=reward.model, image_size=SIZE, region="full", pooling="mean", compare_to="reference")
    assert r.required_fields == ("reference",)
    x, y = _img(3), _img(4)
    assert r([""], [x], reference=[x.clone()])[0] == pytest.approx(1.0, abs=1e-5)
    assert r([""], [x], reference=[y])[0] < 0.9999
    res = score_safely(r, [""], [x], reference=[_img(5, 20, 20)])
    assert res.scores == [None] and "reference is (20, 20)" in res.error


def test_missing_model_offline_says_how_to_fetch(tmp_path):
    with pytest.raises(CheckpointError) as e:
        DinoSimilarity(model_name_or_path=str(tmp_path / "no_such_model"))
    msg = str(e.value)
    assert "dino_similarity: cannot load DINOv2" in msg and "model_name_or_path: DIR" in msg
