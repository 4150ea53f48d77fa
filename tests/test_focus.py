"""Region-focused refinement: crop boxes, crops and the feathered paste-back, with hand-computed geometry."""

import math

import pytest
import torch
import torch.nn.functional as F

from refiner_rl.errors import ConfigError, DataError
from refiner_rl.focus import FocusSettings, crop_batch, feather_weights, focus_boxes, focus_crop, paste_back_feathered

H, W = 37, 45  # odd sizes on purpose


def _mask(*boxes, h=H, w=W):
    """A [B, 1, h, w] mask, item i set inside boxes[i] = (x0, y0, x1, y1) (None: empty)."""
    m = torch.zeros(len(boxes), 1, h, w)
    for i, b in enumerate(boxes):
        if b is not None:
            x0, y0, x1, y1 = b
            m[i, :, y0:y1, x0:x1] = 1
    return m


def test_focus_boxes_by_hand():
    mask = _mask((5, 10, 13, 20), (40, 0, 45, 4), (0, 0, W, H))
    boxes = focus_boxes(mask, margin=0.25, multiple=8)
    # item 0: bbox 8x10 -> pad ceil(2.5) = 3 -> side 16 (a multiple of 8), centred: x (5+13-16)//2 = 1, y 7
    # item 1: touches the top and right borders: bbox 5x4 -> pad 2 -> side 9 -> 16, shifted inside: x 29..45, y 0..16
    # item 2: the whole image: a side rounded up past the image is the image side (45 and 37 are no multiple of 8)
    assert boxes.tolist() == [[1, 7, 17, 23], [29, 0, 45, 16], [0, 0, W, H]]
    assert boxes.dtype == torch.long


def test_empty_mask_is_a_data_error():
    with pytest.raises(DataError, match="the mask of batch item 1 is empty, so there is no region to crop"):
        focus_boxes(_mask((2, 2, 6, 6), None), margin=0.1, multiple=8)
    with pytest.raises(DataError, match=r"mask must be \[B, 1, H, W\]"):
        focus_boxes(torch.ones(1, 3, 8, 8))


def _batch(mask):
    g = torch.Generator().manual_seed(0)
    b = mask.shape[0]
    return {
        "draft": torch.rand(b, 3, H, W, generator=g),
        "target": torch.rand(b, 3, H, W, generator=g),
        "reference": torch.rand(b, 3, 2 * H, 2 * W, generator=g),
        "mask": mask,
        "prompt": ["p"] * b,
    }


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_crop_and_paste_round_trip(ramp):
    mask = _mask((5, 10, 13, 20), (40, 0, 45, 4))
    batch = _batch(mask)
    boxes = focus_boxes(mask, margin=0.25, multiple=8)
    fc = crop_batch(batch, boxes, 24)
    crop = fc.batch
    assert crop["draft"].shape == (2, 3, 24, 24) and crop["mask"].shape == (2, 1, 24, 24)
    assert crop["reference"] is batch["reference"] and crop["prompt"] == batch["prompt"] and fc.ref_boxes is None
    assert set(crop["mask"].unique().tolist()) == {0.0, 1.0}
    # crop 0 is the 16x16 box (1, 7)-(17, 23) upscaled 1.5x: the mask's columns 4..12 and rows 3..13 of the box
    # become columns 6..18 and rows 4.5..19.5 of the crop (12 x 15 pixels)
    ys, xs = crop["mask"][0, 0].nonzero().unbind(1)
    assert crop["mask"][0].sum().item() == 12 * 15 and (xs.min(), xs.max() + 1) == (6, 18)

    refined = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    feather = 3.0
    out = paste_back_feathered(batch["draft"], refined, fc.boxes, feather=feather, ramp=ramp)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        placed = F.interpolate(refined[i : i + 1], size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True)[0]
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        # outside the box: exactly the draft
        assert torch.equal(out[i][:, ~inside], batch["draft"][i][:, ~inside])
        # inside, beyond the band (3 px from sides not on the image border): exactly the resized crop
        cx0, cy0 = x0 + (3 if x0 > 0 else 0), y0 + (3 if y0 > 0 else 0)
        cx1, cy1 = x1 - (3 if x1 < W else 0), y1 - (3 if y1 < H else 0)
        core = placed[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].clamp(0, 1)
        assert torch.equal(out[i, :, cy0:cy1, cx0:cx1], core)
    # in the band: the blend with the hand-computed weight (item 0's left column: centre 0.5 px inside the border)
    x0, y0, x1, y1 = boxes[0].tolist()
    r = 0.5 / feather
    w = r if ramp == "linear" else (1 - math.cos(math.pi * r)) / 2
    placed = F.interpolate(refined[:1], size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True)[0].clamp(0, 1)
    want = batch["draft"][0, :, 15, x0] * (1 - w) + placed[:, 15 - y0, 0] * w
    torch.testing.assert_close(out[0, :, 15, x0], want)


def test_whole_image_mask_pastes_the_whole_crop():
    mask = _mask((0, 0, W, H))
    batch = _batch(mask)
    fc = crop_batch(batch, focus_boxes(mask, margin=0.1, multiple=16), (40, 48))
    assert fc.boxes.tolist() == [[0, 0, W, H]] and fc.batch["draft"].shape == (1, 3, 40, 48)
    refined = torch.rand(1, 3, 40, 48)
    out = paste_back_feathered(batch["draft"], refined, fc.boxes[0], feather=4)
    want = F.interpolate(refined, size=(H, W), mode="bilinear", antialias=True).clamp(0, 1)
    assert torch.equal(out, want)  # every side is on the image border: no feathering


def test_feather_weights_by_hand():
    w = feather_weights(torch.tensor([[2, 0, 8, 4]]), (6, 10), feather=2)[0, 0]
    # columns 2..7 inside; left and right sides are interior (ramp), top is the image border (no ramp), the bottom
    # side y=4 is interior: row 3's centre is 0.5 px from it
    assert w[:, :2].eq(0).all() and w[:, 8:].eq(0).all() and w[4:].eq(0).all()
    assert w[0, 2:8].tolist() == [0.25, 0.75, 1.0, 1.0, 0.75, 0.25]
    assert w[3, 2:8].tolist() == [0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert w[2, 4].item() == 0.75


def test_reference_crop_modes():
    mask = _mask((5, 10, 13, 20), (40, 0, 45, 4))
    batch = _batch(mask)
    boxes = focus_boxes(mask, margin=0.25, multiple=8)
    same = crop_batch(batch, boxes, 16, crop_reference="same_box")
    # the reference is twice the draft's size: the same box in its pixels is twice as large
    assert same.ref_boxes.tolist() == [[2, 14, 34, 46], [58, 0, 90, 32]]
    torch.testing.assert_close(
        same.batch["reference"][0],
        F.interpolate(batch["reference"][:1, :, 14:46, 2:34], size=(16, 16), mode="bilinear", antialias=True)[0],
    )
    given = torch.tensor([[0, 0, 20, 30], [10, 10, 30, 30]])
    own = crop_batch(batch, boxes, 16, crop_reference=True, ref_boxes=given, ref_size=20)
    assert own.ref_boxes.tolist() == given.tolist() and own.batch["reference"].shape == (2, 3, 20, 20)
    with pytest.raises(ConfigError, match="crop_reference=true needs ref_boxes"):
        crop_batch(batch, boxes, 16, crop_reference="true")
    with pytest.raises(ConfigError, match="crop_reference 'zoom' is not one of false, true, same_box"):
        crop_batch(batch, boxes, 16, crop_reference="zoom")


def test_focus_crop_returns_both_forms_and_checks_boxes():
    mask = _mask((20, 20, 30, 30))
    batch = _batch(mask)
    fc = focus_crop(batch, 16, margin=0.2, multiple=16)
    assert fc.boxes.tolist() == [[17, 17, 33, 33]] and fc.full_batch is batch
    refined = fc.batch["target"]  # a perfect refinement at the working size (here the box size: no resampling)
    full, crop = fc.paste_back(refined, feather=0)
    assert crop is refined and torch.equal(full[:, :, 17:33, 17:33], batch["target"][:, :, 17:33, 17:33])
    assert torch.equal(full[:, :, :17], batch["draft"][:, :, :17])
    with pytest.raises(DataError, match=r"paste box \[40, 0, 50, 8\] of item 0 is not inside the 37x45 image"):
        paste_back_feathered(batch["draft"], refined, torch.tensor([40, 0, 50, 8]))
    with pytest.raises(DataError, match=r"crop boxes must be \[1, 4\]"):
        crop_batch(batch, torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]]), 8)


def test_crop_maps_cut_patch_maps_at_the_boxes_by_hand():
    # a 16x16 image, box (4, 4)-(12, 12) refined at 8 px; reward maps of 4-px patches are 4x4: the box covers
    # patches 1..2 in each direction, and the crop's grid at the same scale is 8 * 4 / 16 = 2 patches a side
    mask = _mask((5, 5, 11, 11), h=16, w=16)
    batch = _batch(mask)
    batch = {k: (v[..., :16, :16] if k in ("draft", "target") else v) for k, v in batch.items()}
    fc = crop_batch(batch, torch.tensor([[4, 4, 12, 12]]), 8)
    maps = torch.arange(16.0).reshape(1, 4, 4)
    maps[0, 2, 2] = float("nan")
    out = fc.crop_maps(maps)
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out, maps[:, 1:3, 1:3], equal_nan=True)


def test_focus_settings_crop_score_forms_and_errors():
    # masks touching the border on odd sizes; the working size defaults to the shorter side rounded down (37 -> 36)
    mask = _mask((0, 30, 9, H), (38, 2, W, 12))
    batch = _batch(mask)
    settings = FocusSettings(margin=0.25, feather=2.0)
    fc = settings.crop(batch, multiple=4)
    assert fc.batch["draft"].shape == (2, 3, 36, 36) and fc.batch["reference"] is batch["reference"]
    for (x0, y0, x1, y1), region in zip(fc.boxes.tolist(), ((0, 30, 9, H), (38, 2, W, 12))):
        assert 0 <= x0 <= region[0] and region[2] <= x1 <= W and 0 <= y0 <= region[1] and region[3] <= y1 <= H
    refined = torch.rand(2, 3, 36, 36)
    full, full_batch = fc.scored(refined, settings)
    assert full.shape == (2, 3, H, W) and full_batch is batch
    torch.testing.assert_close(full, fc.paste_back(refined, 2.0)[0])
    crop, crop_batch_ = fc.scored(refined, FocusSettings(score_on="crop"))
    assert crop is refined and crop_batch_ is fc.batch
    with pytest.raises(ConfigError, match="focus_size 30 must be a positive multiple of 16"):
        FocusSettings(size=30).crop(batch, multiple=16)
    with pytest.raises(ConfigError, match="score_on 'tile' is not one of full, crop"):
        FocusSettings(score_on="tile")
    with pytest.raises(ConfigError, match="crop_reference=true needs ref_boxes"):
        FocusSettings(crop_reference="true").crop(batch, multiple=4)
    given = {**batch, "ref_box": torch.tensor([[0, 0, 40, 40], [10, 10, 50, 50]])}
    assert FocusSettings(crop_reference="true").crop(given, 4).ref_boxes.tolist() == given["ref_box"].tolist()


def test_sampling_in_focus_keeps_the_draft_outside_the_box():
    from refiner_rl.data import collate_triplets
    from refiner_rl.sampling import sample_images
    from tests.helpers import small_policy, synthetic_dataset

    policy = small_policy()
    ds = synthetic_dataset(2, size=32)
    batch = collate_triplets([ds[0], ds[1]])
    focus = FocusSettings(size=16, margin=0.125, feather=2.0)
    out = sample_images(policy, batch, num_steps=2, seed=0, focus=focus)
    fc = focus.crop(batch, 4)
    assert out.shape == batch["draft"].shape
    crop_out = sample_images(policy, fc.batch, num_steps=2, seed=0)  # the same noise on the crop
    torch.testing.assert_close(out, fc.paste_back(crop_out, 2.0)[0])
    for i, (x0, y0, x1, y1) in enumerate(fc.boxes.tolist()):
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(out[i][:, outside], batch["draft"][i][:, outside])
