"""masked_pixel: exact values on hand-made images."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl.rewards.masked_pixel import MaskedPixel
from refiner_rl.scoring import score_safely


def _image(h=8, w=8):
    # multiples of 1/256 in [0, 0.5]: adding 0.25 stays exact in float32
    return (torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w) % 128) / 256


def _mask(h=8, w=8, box=(0, 4, 0, 4)):
    m = torch.zeros(1, h, w)
    m[:, box[0] : box[1], box[2] : box[3]] = 1
    return m


def test_identical_images_score_zero_and_map_is_zero_inside_nan_outside():
    x, m = _image(), _mask()
    scores, maps = MaskedPixel(patch_size=4).score_maps([""], [x], target=[x.clone()], mask=[m])
    assert scores == [0.0]
    assert maps[0].shape == (2, 2)
    assert maps[0][0, 0].item() == 0.0
    assert torch.isnan(maps[0]).tolist() == [[False, True], [True, True]]


@pytest.mark.parametrize("error,expected", [("l2", -0.0625), ("l1", -0.25)])
def test_constant_offset_inside_the_mask_gives_minus_d_squared_or_abs(error, expected):
    d = 0.25
    x, m = _image(), _mask()
    sample = x + d * m  # offset inside the mask only
    assert MaskedPixel(error=error)([""], [sample], target=[x], mask=[m]) == [expected]
    # a negative offset gives the same L1/L2 value
    assert MaskedPixel(error=error)([""], [x - d * m + d], target=[x + d], mask=[m]) == [expected]


def test_outside_region_ignores_in_mask_error_and_sees_outside_error():
    d = 0.25
    x, m = _image(), _mask()
    inside_change = x + d * m
    assert MaskedPixel(region="outside")([""], [inside_change], target=[x], mask=[m]) == [0.0]
    outside_change = x + d * (1 - m)
    assert MaskedPixel(region="outside")([""], [outside_change], target=[x], mask=[m]) == [-d * d]
    assert MaskedPixel(region="inside")([""], [outside_change], target=[x], mask=[m]) == [0.0]


def test_channel_mean_and_soft_mask_by_hand():
    x = torch.zeros(3, 1, 2)
    y = x.clone()
    y[0, 0, 0] = 0.5  # one channel off by 0.5 at pixel 0: err = 0.25 / 3
    y[:, 0, 1] = 0.25  # all channels off by 0.25 at pixel 1: err = 0.0625
    m = torch.tensor([[[1.0, 0.5]]])
    expected = -(1.0 * 0.25 / 3 + 0.5 * 0.0625) / 1.5
    (score,) = MaskedPixel()([""], [y], target=[x], mask=[m])
    assert score == pytest.approx(expected, abs=1e-12)


def test_no_mask_column_means_whole_image_and_empty_mask_is_none():
    x = _image()
    y = x + 0.25
    assert MaskedPixel()([""], [y], target=[x]) == [-0.0625]
    assert MaskedPixel(region="outside")([""], [y], target=[x]) == [None]  # outside of "everything" is empty
    empty = torch.zeros(1, 8, 8)
    r = MaskedPixel(patch_size=4)
    scores, _maps = r.score_maps(["", ""], [y, y], target=[x, x], mask=[empty, _mask()])
    assert scores == [None, -0.0625]
    result = score_safely(r, ["", ""], [y, y], target=[x, x], mask=[empty, _mask()])
    assert result.scores == [None, -0.0625] and result.n_failed == 1 and result.maps[0] is None


def test_per_patch_map_holds_each_cells_own_error_with_partial_edge_cells():
    x = torch.zeros(3, 6, 6)
    y = x.clone()
    y[:, :4, :4] = 0.5  # cell (0,0): error 0.25
    y[:, 4:, 4:] = 0.25  # cell (1,1) (a 2x2 partial cell): error 0.0625
    m = torch.ones(1, 6, 6)
    m[:, 0:4, 4:6] = 0  # cell (0,1) has no mask pixel
    scores, maps = MaskedPixel(patch_size=4).score_maps([""], [y], target=[x], mask=[m])
    mp = maps[0]
    assert mp.shape == (2, 2)
    assert mp[0, 0].item() == -0.25 and mp[1, 1].item() == -0.0625 and mp[1, 0].item() == 0.0
    assert math.isnan(mp[0, 1].item())
    assert scores[0] == pytest.approx(-(16 * 0.25 + 4 * 0.0625) / m.sum().item(), abs=1e-12)


def test_pil_inputs_are_accepted():
    arr = np.full((4, 4, 3), 100, dtype=np.uint8)
    target = Image.fromarray(arr)
    sample = Image.fromarray(arr + 20)
    mask = Image.fromarray(np.full((4, 4), 255, dtype=np.uint8), mode="L")
    (score,) = MaskedPixel()([""], [sample], target=[target], mask=[mask])
    assert score == pytest.approx(-((20 / 255) ** 2), abs=1e-7)


def test_size_mismatch_raises_naming_fields_and_safe_call_turns_it_into_none():
    r = MaskedPixel()
    with pytest.raises(ValueError, match=r"completion is \(8, 8\) \(H, W\) but target is \(4, 4\)"):
        r([""], [_image()], target=[_image(4, 4)])
    with pytest.raises(ValueError, match=r"but mask is \(8, 4\)"):
        r([""], [_image()], target=[_image()], mask=[torch.ones(1, 8, 4)])
    scores, _, n_failed, err = score_safely(r, ["", ""], [_image(), _image()], target=[_image(), _image(4, 4)])
    assert scores == [None, None] and n_failed == 2 and "target is (4, 4)" in err


def test_bad_options():
    with pytest.raises(ValueError, match="region must be 'inside' or 'outside'"):
        MaskedPixel(region="border")
    with pytest.raises(ValueError, match="patch_size must be a positive"):
        MaskedPixel(patch_size=0)


def test_missing_target_for_a_sample_names_reward_sample_and_field():
    with pytest.raises(ValueError, match="reward 'masked_pixel': sample 1 has no 'target'"):
        MaskedPixel()(["", ""], [_image(), _image()], target=[_image(), None])
