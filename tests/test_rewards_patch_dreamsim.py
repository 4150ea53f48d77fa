"""patch_dreamsim with DreamSim's real model class and loading code, random weights, no download.

The cache folder is written by ``make_random_dreamsim_cache`` in the layout dreamsim 0.2.1 expects
(torch-hub code + backbone checkpoint + head + LoRA adapter) and loaded through ``dreamsim.dreamsim(...)``,
the call a real run makes. The backbone is a 12-block ViT of width 32 (DreamSim reads block 11).
"""

import math
import os

import pytest
import torch

from refiner_rl.errors import CheckpointError
from refiner_rl.rewards.patch_dreamsim import (
    DREAMSIM_SIZE,
    PatchDreamSim,
    default_cache_dir,
    load_dreamsim,
    missing_cache_files,
)
from refiner_rl.scoring import score_safely
from refiner_rl.scoring.patches import crop_resize, grow_box, mask_bbox, splat_to_grid, tile_box
from tests.dreamsim_cache import make_random_dreamsim_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return make_random_dreamsim_cache(tmp_path_factory.mktemp("dreamsim_cache"), seed=0)


@pytest.fixture(scope="module")
def reward(cache_dir):
    return PatchDreamSim(cache_dir=cache_dir, patch_size=32, selection="bbox", dilation=0)


def _images(n=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for _ in range(n)]


def _mask(h=64, w=64, box=(8, 24, 40, 56)):
    m = torch.zeros(1, h, w)
    m[:, box[0] : box[1], box[2] : box[3]] = 1
    return m


# -- geometry ------------------------------------------------------------------------------------------


def test_patch_geometry_by_hand():
    m = torch.zeros(1, 10, 10)
    m[:, 3:5, 6:8] = 1
    assert mask_bbox(m) == (3, 5, 6, 8)
    assert mask_bbox(m, dilation=4) == (0, 9, 2, 10)
    assert mask_bbox(torch.zeros(1, 4, 4)) is None
    assert grow_box((3, 5, 6, 8), 4, 10, 10) == (2, 6, 5, 9)
    assert grow_box((0, 2, 8, 10), 4, 10, 10) == (0, 4, 6, 10)  # pushed back inside the image
    patches = tile_box((0, 10, 0, 6), 4)
    assert [p.owner for p in patches] == [
        (0, 4, 0, 4),
        (0, 4, 4, 6),
        (4, 8, 0, 4),
        (4, 8, 4, 6),
        (8, 10, 0, 4),
        (8, 10, 4, 6),
    ]
    assert [p.content for p in patches] == [
        (0, 4, 0, 4),
        (0, 4, 2, 6),
        (4, 8, 0, 4),
        (4, 8, 2, 6),
        (6, 10, 0, 4),
        (6, 10, 2, 6),
    ]
    # a map is the owner-area-weighted mean per grid cell; NaN where nothing is owned
    mp = splat_to_grid([(0, 4, 0, 4), (0, 2, 4, 8), (2, 4, 4, 8)], torch.tensor([1.0, 2.0, 4.0]), 8, 8, 4)
    assert mp[0].tolist() == [1.0, 3.0] and torch.isnan(mp[1]).all()
    crops = crop_resize(torch.rand(3, 10, 10), [(0, 4, 0, 4), (2, 6, 2, 6), (0, 10, 0, 10)], 8)
    assert crops.shape == (3, 3, 8, 8) and crops.min() >= 0 and crops.max() <= 1


# -- loading -------------------------------------------------------------------------------------------


def test_loads_dreamsims_model_class_through_the_real_cache_path(reward, cache_dir):
    from dreamsim.model import PerceptualModel
    from peft import PeftModel
    from safetensors.torch import load_file

    assert missing_cache_files(cache_dir, "dino_vitb16") == []
    assert isinstance(reward.model, PeftModel)
    assert isinstance(reward.model.get_base_model(), PerceptualModel)
    assert not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    # the LoRA adapter written to the cache is the one in the loaded model (non-zero B, so it matters)
    saved = load_file(os.path.join(cache_dir, "dino_vitb16_single_lora", "adapter_model.safetensors"))
    key = next(k for k in saved if "lora_B" in k)
    loaded = dict(reward.model.named_parameters())
    match = [
        v
        for k, v in loaded.items()
        if "lora_B" in k and k.endswith(key.split("base_model.model.")[-1].replace(".weight", ".default.weight"))
    ]
    assert match and torch.equal(match[0].detach(), saved[key]) and saved[key].abs().sum() > 0
    assert torch.hub.get_dir() != cache_dir  # dreamsim's set_dir is undone


def test_missing_weights_offline_fail_fast_with_fetch_instructions(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        PatchDreamSim(cache_dir=str(tmp_path / "empty"), allow_download=True)
    msg = str(e.value)
    assert "patch_dreamsim: DreamSim weights for dreamsim_type='dino_vitb16' are not in cache_dir=" in msg
    assert "missing: dino_vitb16_pretrain.pth, dino_vitb16_single_lora" in msg
    assert "from dreamsim import dreamsim; dreamsim(pretrained=True" in msg and "HF_HUB_OFFLINE is set" in msg
    assert f"cache_dir: {tmp_path / 'empty'}" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(CheckpointError, match="allow_download is false"):
        load_dreamsim(str(tmp_path / "empty"))
    # without cache_dir: a per-user cache, never ./models in the working directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "refiner_rl" / "dreamsim")
    with pytest.raises(CheckpointError, match=f"cache_dir='{tmp_path / 'xdg' / 'refiner_rl' / 'dreamsim'}'"):
        PatchDreamSim()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "refiner_rl", "dreamsim")
    with pytest.raises(ValueError, match="unknown dreamsim_type 'vit_huge'"):
        load_dreamsim(str(tmp_path), dreamsim_type="vit_huge")


# -- scoring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["bbox", "grid", "both"])
def test_identical_images_score_one(reward, selection):
    r = PatchDreamSim.from_model(reward.model, patch_size=32, selection=selection)
    x = _images(2)
    scores, maps = r.score_maps(["", ""], x, target=[t.clone() for t in x], mask=[_mask(), _mask()])
    assert scores == pytest.approx([1.0, 1.0], abs=1e-5)
    for mp in maps:
        assert mp.shape == (2, 2)
        assert torch.nan_to_num(mp, nan=1.0).sub(1).abs().max() < 1e-5


def test_bbox_map_is_nan_outside_the_selection(reward):
    x = _images(1, 96, 96)
    y = [x[0].flip(-1)]
    m = _mask(96, 96, box=(4, 20, 70, 90))  # inside grid cell (0, 2)
    scores, maps = reward.score_maps([""], y, target=x, mask=[m])
    mp = maps[0]
    assert mp.shape == (3, 3)
    assert torch.isnan(mp).tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    assert scores[0] == pytest.approx(mp[0, 2].item(), abs=1e-6) and scores[0] < 0.999


def test_score_is_one_minus_dreamsim_distance_of_the_patch(reward):
    """An independent path: dreamsim's own forward on the two resized crops."""
    x, y = _images(2, 64, 64)
    m = _mask(64, 64, box=(8, 24, 40, 56))
    # bbox (8,24,40,56) grown to 32 px: (0, 32, 32, 64): exactly one patch
    box = grow_box(mask_bbox(m), 32, 64, 64)
    assert box == (0, 32, 32, 64)
    a = crop_resize(y, [box], DREAMSIM_SIZE)
    b = crop_resize(x, [box], DREAMSIM_SIZE)
    with torch.no_grad():
        expected = 1 - reward.model(a, b).item()
    (score,) = reward([""], [y], target=[x], mask=[m])
    assert score == pytest.approx(expected, abs=1e-5)
    assert expected < 0.999  # a random image pair is not "identical" to DreamSim


def test_area_aggregation_weights_patches_by_mask_pixels(reward):
    x, y = _images(2, 64, 32)
    m = torch.zeros(1, 64, 32)
    m[:, 0:24, :] = 1  # 768 pixels in cell (0, 0)
    m[:, 32:40, :] = 1  # 256 pixels in cell (1, 0)
    r = PatchDreamSim.from_model(reward.model, patch_size=32, selection="grid", aggregate="area")
    (score,), (mp,) = r.score_maps([""], [y], target=[x], mask=[m])
    v0, v1 = mp[0, 0].item(), mp[1, 0].item()
    assert v0 != pytest.approx(v1)
    assert score == pytest.approx((768 * v0 + 256 * v1) / 1024, abs=1e-6)
    mean_r = PatchDreamSim.from_model(reward.model, patch_size=32, selection="grid", aggregate="mean")
    assert mean_r([""], [y], target=[x], mask=[m])[0] == pytest.approx((v0 + v1) / 2, abs=1e-6)


def test_batched_equals_one_at_a_time_and_chunking_does_not_matter(reward):
    xs, ys = _images(2, 64, 64, seed=1), _images(2, 64, 64, seed=2)
    masks = [_mask(box=(30, 60, 0, 20)), _mask(box=(0, 64, 0, 64))]
    # batch_size 3: chunks of patch pairs straddle the two images
    r = PatchDreamSim.from_model(reward.model, patch_size=32, selection="bbox", batch_size=3)
    batched = r(["", ""], ys, target=xs, mask=masks)
    single = [r([""], [ys[i]], target=[xs[i]], mask=[masks[i]])[0] for i in range(2)]
    assert batched == pytest.approx(single, abs=1e-5)
    r.batch_size = 64
    assert r(["", ""], ys, target=xs, mask=masks) == pytest.approx(batched, abs=1e-5)


def test_empty_mask_none_size_mismatch_and_safe_call(reward):
    x, y = _images(2)
    empty = torch.zeros(1, 64, 64)
    assert reward(["", ""], [y, y], target=[x, x], mask=[empty, _mask()])[0] is None
    grid = PatchDreamSim.from_model(reward.model, patch_size=32, selection="grid")
    assert grid([""], [y], target=[x], mask=[empty])[0] is not None  # grid + mean needs no mask pixel
    with pytest.raises(ValueError, match=r"completion is \(64, 64\) \(H, W\) but target is \(32, 32\)"):
        reward([""], [y], target=[x[:, :32, :32]])
    scores, _maps, n_failed, err = score_safely(reward, ["", ""], [y, y], target=[x, x[:, :32, :32]])
    assert scores == [None, None] and n_failed == 2 and "target is (32, 32)" in err


def test_compare_to_reference_changes_required_fields(reward):
    r = PatchDreamSim.from_model(reward.model, compare_to="reference", patch_size=32, selection="grid")
    assert r.required_fields == ("reference",)
    x, y = _images(2)
    (score,) = r([""], [y], reference=[y.clone()], target=[x])
    assert score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="selection must be"):
        PatchDreamSim.from_model(reward.model, selection="random")
    assert math.isfinite(PatchDreamSim.from_model(reward.model, patch_size=32)([""], [y], target=[x])[0])


def test_loading_leaves_the_callers_rng_alone(cache_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_dreamsim(cache_dir)  # builds dreamsim's DINO head with random init before loading weights
    assert torch.equal(torch.rand(3), expected)
