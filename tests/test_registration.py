"""Reference registration: the scale and translation of a panned or zoomed reference are found from the draft around
the mask, the warped reference lines up with the target inside the mask, and the dataset option applies it."""

import numpy as np
import pytest
import torch

from refiner_rl.data import TripletDataset, collate_triplets, synthetic_records
from refiner_rl.data.images import to_tensor
from refiner_rl.data.registration import register_reference, warp_reference
from refiner_rl.errors import ConfigError
from tests.helpers import data_seeds, learning_figure

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(r):
    t, d, ref = (to_tensor(r[k]) for k in ("target", "draft", "reference"))
    return t, d, ref, (to_tensor(r["mask"]) >= 0.5).float()


def _in_mask(a, b, m):
    return float(((a - b) ** 2 * m).sum() / (3 * m.sum()))


@pytest.mark.parametrize("geometry", ["shifted", "zoomed"])
def test_registration_finds_the_transform_and_lines_the_detail_up(geometry):
    ratios, hits = [], 0
    seed = 5 + data_seeds()[0]  # 5 unless bench/learning_margins.py draws other records
    records = synthetic_records(16, seed=seed, size=32, geometry=geometry, shift_step=4, zoom_range=(1.5, 2.0))
    for r in records:
        target, draft, ref, mask = _tensors(r)
        s, ox, oy, cost = register_reference(draft, ref, mask)
        t = np.asarray(r["ref_transform"]).reshape(3, 3)
        # the region's centre lands where the record says (within a pixel), at the right scale (within 3%)
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        cx, cy = (float(xs.min()) + float(xs.max()) + 1) / 2, (float(ys.min()) + float(ys.max()) + 1) / 2
        found = np.array([s * cx + ox, s * cy + oy])
        truth = (t @ np.array([cx, cy, 1.0]))[:2]
        hits += bool(np.abs(found - truth).max() < 1.0 and abs(s / t[0, 0] - 1) < 0.03)
        aligned = warp_reference(ref, (s, ox, oy), (32, 32), "bilinear")
        ratios.append(_in_mask(aligned, target, mask) / _in_mask(draft, target, mask))
    # measured over 5 record sets (bench/learning_margins.py): shifted 16/16 found, in-mask error 0.00x the draft's;
    # zoomed 14-16/16, 0.03-0.18x
    learning_figure(f"registration {geometry}: transforms found of 16", hits, ">=", 12)
    learning_figure(f"registration {geometry}: in-mask error, warped reference / draft", np.mean(ratios), "<", 0.25)


def test_another_records_reference_does_not_line_up():
    # registration cannot invent the detail: a reference from another record stays far from the target in the mask
    records = synthetic_records(8, seed=9, size=32, geometry="shifted")
    own, other = [], []
    for i, r in enumerate(records):
        target, draft, ref, mask = _tensors(r)
        foreign = _tensors(records[(i + 1) % len(records)])[2]
        for refs, out in ((ref, own), (foreign, other)):
            s, ox, oy, _ = register_reference(draft, refs, mask)
            out.append(_in_mask(warp_reference(refs, (s, ox, oy), (32, 32), "bilinear"), target, mask))
    assert np.mean(other) > 10 * np.mean(own) + 0.01, (own, other)


def test_an_aligned_reference_on_another_background_stays_in_place():
    # the detail is at the region's own place but everything around it differs: only the mask's part can match
    for r in synthetic_records(12, seed=3, size=32, geometry="aligned"):
        target, draft, ref, mask = _tensors(r)
        s, ox, oy, _ = register_reference(draft, ref, mask)
        assert (s, ox, oy) == (1.0, 0.0, 0.0)
        assert torch.equal(warp_reference(ref, (s, ox, oy), (32, 32), "bilinear"), ref)


def test_warp_geometry_by_hand():
    ref = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    # s = 2, o = (1, 3): draft pixel (x, y) reads reference point (2x + 2, 2y + 4), the corner of pixel (2x + 2, 2y + 4)
    out = warp_reference(ref, (2.0, 1.0, 3.0), (3, 3), "nearest")
    assert out[:, 0, 0].tolist() == ref[:, 4, 2].tolist() and out[:, 1, 2].tolist() == ref[:, 6, 6].tolist()
    assert (out[:, 2] == 0).all()  # row 2 reads y = 8.. outside the reference: 0
    half = warp_reference(ref, (1.0, 0.5, 0.0), (8, 8), "bilinear")  # half a pixel right: the mean of neighbours
    assert torch.allclose(half[:, :, 0:7], (ref[:, :, 0:7] + ref[:, :, 1:8]) / 2)


def test_large_images_are_registered_at_a_reduced_resolution():
    # a 128-pixel scene and a reference zoomed 1.6x around the region: registered at 1/2 of the resolution
    g = torch.Generator().manual_seed(0)
    scene = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(128, 128), mode="bicubic")
    scene = scene.clamp(0, 1)[0]
    scene[:, 40:72, 50:82] = torch.rand(3, 8, 8, generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    mask = torch.zeros(1, 128, 128)
    mask[:, 40:72, 50:82] = 1
    draft = scene.clone()
    draft[:, 40:72, 50:82] = (
        torch.nn.functional.avg_pool2d(scene[None, :, 40:72, 50:82], 8)[0]
        .repeat_interleave(8, 1)
        .repeat_interleave(8, 2)
    )
    s_true, o_true = 1.6, (-60.0, -40.0)
    ref = warp_reference(scene, (1 / s_true, -o_true[0] / s_true, -o_true[1] / s_true), (128, 128), "bilinear")
    s, ox, oy, _ = register_reference(draft, ref, mask, work_size=48)
    assert abs(s / s_true - 1) < 0.03 and abs(ox - o_true[0]) < 2.5 and abs(oy - o_true[1]) < 2.5, (s, ox, oy)


def test_dataset_option_warps_each_reference_into_the_draft_frame():
    records = synthetic_records(4, seed=1, size=32, geometry="zoomed", zoom_range=(1.5, 2.0))
    plain = TripletDataset(records, multiple=16)
    ds = TripletDataset(records, multiple=16, reference_alignment="register")
    batch, raw = collate_triplets([ds[i] for i in range(4)]), collate_triplets([plain[i] for i in range(4)])
    assert batch["reference"].shape == batch["draft"].shape and ds.bucket_of(0) == (32, 32, 32, 32)
    assert set(ds.reference_transforms) == {0, 1, 2, 3} and all(t[0] > 1.3 for t in ds.reference_transforms.values())
    err = lambda refs: ((refs - batch["target"]) ** 2 * batch["mask"]).sum() / batch["mask"].sum()  # noqa: E731
    assert err(batch["reference"]) < 0.3 * err(raw["reference"])
    # registered up front in two worker processes: the same transforms as one item at a time
    eager = TripletDataset(records, multiple=16, reference_alignment="register")
    eager.register_references(progress=False, num_workers=2)
    assert eager.reference_transforms == ds.reference_transforms
    with pytest.raises(ConfigError, match="reference_alignment 'warp' is not one of none, register"):
        TripletDataset(records, multiple=16, reference_alignment="warp")


def test_found_registrations_are_reused_from_the_cache(tmp_path, monkeypatch, caplog):
    """A second dataset over the same records (a resume, a later stage) reads its transforms from the cache and
    searches nothing; other settings or other images miss; a torn line is skipped."""
    import logging

    from refiner_rl.data.registration import RegistrationCache

    records = synthetic_records(3, seed=2, size=32, geometry="zoomed", zoom_range=(1.5, 2.0))
    first = TripletDataset(records, multiple=16, reference_alignment="register")
    first.register_references(progress=False, cache_dir=str(tmp_path))
    lines = (tmp_path / RegistrationCache.FILE).read_text().splitlines()
    assert len(lines) == 3
    with open(tmp_path / RegistrationCache.FILE, "a") as f:
        f.write('{"key": "torn", "transf')  # a run killed mid-line

    def no_search(*args, **kwargs):
        raise AssertionError("registration searched although cached")

    again = TripletDataset(records, multiple=16, reference_alignment="register")
    with monkeypatch.context() as m, caplog.at_level(logging.INFO):
        m.setattr(TripletDataset, "_register", no_search)
        again.register_references(progress=False, cache_dir=str(tmp_path))
    assert again.reference_transforms == first.reference_transforms
    assert "3 of 3 items read from" in caplog.text
    # other settings, or one record's images changed: searched again, and the new entries added
    wider = TripletDataset(records, multiple=16, reference_alignment="register", registration={"scale_range": (0.4, 3)})
    changed = [dict(r) for r in records]
    changed[0]["draft"] = changed[1]["draft"]
    calls = []
    for ds in (wider, TripletDataset(changed, multiple=16, reference_alignment="register")):
        with monkeypatch.context() as m:
            m.setattr(
                TripletDataset, "_register", lambda self, item, key="reference": calls.append(key) or (1, 0, 0, 0)
            )
            ds.register_references(progress=False, cache_dir=str(tmp_path))
    assert len(calls) == 3 + 1
    assert len(RegistrationCache(str(tmp_path)).load()) == 3 + 3 + 1


def test_data_arguments_pass_the_alignment():
    from transformers import HfArgumentParser

    from refiner_rl.configs import DataArguments

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--reference_alignment", "register", "--registration_scale_range", "1", "2.5", "--synthetic_records", "2"]
    )
    ds = args.build(multiple=16)
    assert ds.reference_alignment == "register" and ds.registration == {"scale_range": (1.0, 2.5)}
    with pytest.raises(ConfigError, match="`registration_scale_range` must be"):
        DataArguments(registration_scale_range=[2.0, 1.0])
    with pytest.raises(ConfigError, match="`reference_alignment` must be one of none, register"):
        DataArguments(reference_alignment="yes")
