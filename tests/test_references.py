"""A record's ``reference`` may be one image or a list: each reference is read, validated, registered and
focus-cropped on its own, batches carry them as ``reference``, ``reference_2``, ...; Qwen-Image-Edit takes all of them
as condition images, FLUX.1-Kontext and FLUX.1-Fill one (a record with more is a one-line error naming it)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl.cli.main import main
from refiner_rl.data import TripletDataset, collate_triplets, synthetic_records
from refiner_rl.data.records import BucketBatchOrderSampler, reference_columns
from refiner_rl.data.synthetic import write_synthetic_dataset
from refiner_rl.data.validation import RecordError
from refiner_rl.errors import ConfigError, DataError
from refiner_rl.focus import crop_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_synthetic_records_with_two_references_keep_the_one_reference_records(tmp_path):
    one = synthetic_records(3, seed=5, size=16)
    two = synthetic_records(3, seed=5, size=16, num_references=2)
    first = two[0]
    # the first record is drawn as before; its distractor comes after (later records then differ)
    assert isinstance(first["reference"], list) and len(first["reference"]) == 2 and first["ref_index"] == 1
    for key in ("draft", "target", "mask"):
        assert np.array_equal(_pixels(first[key]), _pixels(one[0][key]))
    assert np.array_equal(_pixels(first["reference"][1]), _pixels(one[0]["reference"]))
    mask = _pixels(first["mask"])[..., 0] >= 128
    detail, distractor = (_pixels(r).astype(float) for r in reversed(first["reference"]))
    target = _pixels(first["target"]).astype(float)
    assert np.abs(detail - target)[mask].mean() == 0.0  # aligned: the detail sits at the region's place
    assert np.abs(distractor - target)[mask].mean() > 20.0  # another scene's detail
    assert "ref_index" not in one[0] and not isinstance(one[0]["reference"], list)
    ahead = synthetic_records(2, seed=5, size=16, num_references=3, detail_reference=0)[0]
    assert ahead["ref_index"] == 0 and np.array_equal(_pixels(ahead["reference"][0]), _pixels(one[0]["reference"]))
    with pytest.raises(ConfigError, match="detail_reference an index"):
        synthetic_records(1, size=16, num_references=2, detail_reference=2)


def test_a_jsonl_record_holds_a_list_of_reference_paths(tmp_path):
    path = write_synthetic_dataset(str(tmp_path), 3, seed=2, size=16, num_references=2)
    row = json.loads(open(path).readline())
    assert row["reference"] == ["syn-2-0_reference_0.png", "syn-2-0_reference_1.png"] and row["ref_index"] == 1
    ds = TripletDataset.from_source(path, multiple=4)
    item = ds[0]
    assert reference_columns(item) == ["reference", "reference_2"] and ds.num_references(0) == 2
    for key, name in (("reference", row["reference"][0]), ("reference_2", row["reference"][1])):
        expected = torch.from_numpy(_pixels(Image.open(tmp_path / name)).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(item[key], expected)
    batch = collate_triplets([ds[i] for i in range(3)])
    assert batch["reference_2"].shape == (3, 3, 16, 16) and reference_columns(batch) == ["reference", "reference_2"]
    # one reference: the item and the batch are what they were (no second column)
    single = TripletDataset.from_source(write_synthetic_dataset(str(tmp_path / "one"), 2, size=16), multiple=4)
    assert reference_columns(single[0]) == ["reference"] and single.num_references(0) == 1
    assert single.bucket_of(0) == (16, 16, 16, 16) and len(ds.bucket_of(0)) == 6


def test_each_reference_is_validated_and_a_batch_holds_one_number_of_references(tmp_path):
    recs = synthetic_records(3, seed=1, size=16, num_references=2)
    one = synthetic_records(1, seed=9, size=16)[0]
    mixed = TripletDataset([one, *recs], None, multiple=4, buckets=[16])  # in memory: one image and lists mix
    assert [mixed.num_references(i) for i in range(4)] == [1, 2, 2, 2]
    with pytest.raises(DataError, match=r"records \[0, 1\] have \[1, 2\] references in one batch"):
        collate_triplets([mixed[0], mixed[1]])
    batches = list(BucketBatchOrderSampler(mixed, batch_size=1))
    assert sorted(batches) == [0, 1, 2, 3]
    groups = {len(mixed.bucket_of(i)) for i in range(4)}
    assert groups == {4, 6}  # the number of references is part of the size bucket
    bad = dict(recs[0], reference=[recs[0]["reference"][0], str(tmp_path / "missing.png")])
    with pytest.raises(RecordError, match=r"record 0 \(id='syn-1-0'\), field 'reference' \[1\]: file not found"):
        TripletDataset([bad], None, multiple=4)
    with pytest.raises(RecordError, match="missing field 'reference'"):
        TripletDataset([dict(recs[0], reference=[])], None, multiple=4)


def test_each_reference_is_registered_on_its_own():
    recs = synthetic_records(2, seed=3, size=32, geometry="shifted", shift_step=4)
    twice = [dict(r, reference=[r["reference"], r["reference"].transpose(Image.FLIP_LEFT_RIGHT)]) for r in recs]
    one = TripletDataset(recs, None, multiple=4, reference_alignment="register")
    two = TripletDataset(twice, None, multiple=4, reference_alignment="register")
    two.register_references(progress=False)
    for i in range(2):
        a, b = one[i], two[i]
        assert torch.equal(a["reference"], b["reference"])  # the first reference: registered as before
        assert b["reference_2"].shape == a["reference"].shape  # the second, warped into the draft's frame too
        assert two.reference_transforms[i] == one.reference_transforms[i]
        (t2,) = two.extra_reference_transforms[i]
        assert t2 != two.reference_transforms[i]  # a mirrored view lines up otherwise: its own registration
    assert two.bucket_of(0) == (32, 32) * 3


def test_focus_crop_cuts_each_reference_on_its_own():
    g = torch.Generator().manual_seed(0)
    batch = {
        "draft": torch.rand(2, 3, 16, 16, generator=g),
        "mask": torch.zeros(2, 1, 16, 16),
        "reference": torch.rand(2, 3, 16, 16, generator=g),
        "reference_2": torch.rand(2, 3, 32, 32, generator=g),
    }
    boxes = torch.tensor([[0, 0, 8, 8], [8, 8, 16, 16]])
    crop = crop_batch(batch, boxes, 8, crop_reference="same_box")
    assert torch.equal(crop.batch["reference"][0], batch["reference"][0, :, :8, :8])
    # the 32 px reference is cut at the box scaled to its size, then resized to the working size
    expected = torch.nn.functional.interpolate(
        batch["reference_2"][1:, :, 16:, 16:], size=(8, 8), mode="bilinear", antialias=True
    )
    assert torch.allclose(crop.batch["reference_2"][1:], expected.clamp(0, 1), atol=1e-6)
    own = [torch.tensor([[4, 4, 12, 12]] * 2), torch.tensor([[0, 0, 16, 16]] * 2)]
    crop = crop_batch(batch, boxes, 8, crop_reference="true", ref_boxes=own)
    assert torch.equal(crop.batch["reference"][1], batch["reference"][1, :, 4:12, 4:12])
    assert torch.equal(crop.ref_boxes, own[0])
    with pytest.raises(ConfigError, match="a list with one per reference"):
        crop_batch(batch, boxes, 8, crop_reference="true", ref_boxes=own[0])


def test_kontext_and_fill_take_one_reference_a_record_with_more_is_named(tmp_path, capsys):
    from refiner_rl.policies import FillPolicy, KontextPolicy
    from refiner_rl.sampling import sample_images

    path = write_synthetic_dataset(str(tmp_path), 2, seed=4, size=16, num_references=2)
    cmd = ["sft", "--model_name_or_path", "tiny", "--dataset", path, "--max_steps", "1", "--output_dir"]
    assert main([*cmd, str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("refiner-rl sft: error:")]
    assert "record 0 (id='syn-4-0'): 2 references, but KontextPolicy takes one" in err
    batch = collate_triplets([TripletDataset.from_source(path, multiple=4)[i] for i in range(2)])
    for policy in (KontextPolicy.tiny(), FillPolicy.tiny()):
        with pytest.raises(DataError, match=rf"records \[0, 1\] have 2 references each, but {type(policy).__name__}"):
            sample_images(policy, batch, num_steps=1, seed=0)


def test_qwen_edit_takes_every_reference_as_a_condition_image():
    from refiner_rl.policies import QwenEditPolicy
    from refiner_rl.sampling import batch_conditions

    policy = QwenEditPolicy.tiny(codec="pixel", vae_condition_area=None)
    ds = TripletDataset(synthetic_records(2, seed=6, size=16, num_references=3), None, multiple=4)
    batch = collate_triplets([ds[i] for i in range(2)])
    cond, _ = batch_conditions(policy, batch)
    assert len(cond.img_shapes) == 5  # target, draft, three references
    own = policy.encode_conditions(
        batch["draft"], batch["reference"], batch["reference_2"], batch["reference_3"], prompts=batch["prompt"]
    )
    assert torch.equal(cond.tokens, own.tokens) and torch.equal(cond.text.embeds, own.text.embeds)
