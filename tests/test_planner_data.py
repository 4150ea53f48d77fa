"""Decomposition records: validation errors name the record, and the TRL form is what GRPOTrainer takes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from refiner_rl.agents.data import load_decomposition_dataset, planner_messages, with_image
from refiner_rl.errors import DataError

TRIPLE = {"action": "remove", "subject": "the sign", "goal": "background only"}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / "img" / "a.png")
    return tmp_path


def write(folder, *records) -> str:
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_jsonl_records_become_trl_conversational_vlm_rows(folder):
    good = {"id": "a1", "image": "img/a.png", "instruction": " remove the sign ", "decomposition": [TRIPLE]}
    ds = load_decomposition_dataset(write(folder, good))
    row = ds[0]
    assert row["id"] == "a1" and row["image"].size == (20, 12) and row["image"].mode == "RGB"
    assert row["prompt"] == planner_messages("remove the sign")
    assert row["prompt"][-1] == {"role": "user", "content": "Instruction: remove the sign"}
    assert row["decomposition"] == [TRIPLE]
    assert row["solution"] == "<action>remove</action><subject>the sign</subject><goal>background only</goal>"
    # TRL's own multimodal preparation puts the image first in the user turn, as the pipeline does at inference.
    from trl.data_utils import prepare_multimodal_messages

    image = row["image"]
    assert prepare_multimodal_messages(row["prompt"], images=[image]) == with_image(row["prompt"], image)
    # A folder holding records.jsonl reads the same.
    assert len(load_decomposition_dataset(str(folder))) == 1


def test_datasets_input(folder):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"image": str(folder / "img" / "a.png"), "instruction": "remove the sign", "decomposition": [TRIPLE]}]
    )
    assert load_decomposition_dataset(ds)[0]["decomposition"] == [TRIPLE]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "x", "image": "img/a.png", "instruction": "remove it"}, r"record 0 \(id='x'\): no ground-truth"),
        ({"image": "img/a.png", "instruction": "remove it", "decomposition": []}, "record 0: no ground-truth"),
        (
            {
                "image": "img/a.png",
                "instruction": "remove it",
                "decomposition": [{"action": "remove", "subject": "it"}],
            },
            r"record 0: decomposition\[0\].goal is missing or empty",
        ),
        (
            {"image": "img/a.png", "instruction": "x", "decomposition": [{**TRIPLE, "goal": "<b>"}]},
            r"decomposition\[0\].goal contains '<' or '>'",
        ),
        ({"image": "img/a.png", "decomposition": [TRIPLE]}, "record 0: `instruction` is missing or empty"),
        (
            {"image": "img/missing.png", "instruction": "x", "decomposition": [TRIPLE]},
            "image file not found: .*missing.png",
        ),
        ({"instruction": "x", "decomposition": [TRIPLE]}, r"record 0: no `image`"),
        ({"image": "img/a.png", "instruction": "x", "decomposition": "remove"}, "must be a list"),
    ],
)
def test_bad_records_name_the_record(folder, record, message):
    with pytest.raises(DataError, match=message):
        load_decomposition_dataset(write(folder, record))


def test_second_record_is_named_and_files_are_checked(folder):
    good = {"image": "img/a.png", "instruction": "x", "decomposition": [TRIPLE]}
    with pytest.raises(DataError, match=r"record 1 \(id='b'\): no ground-truth"):
        load_decomposition_dataset(write(folder, good, {"id": "b", "image": "img/a.png", "instruction": "y"}))
    with pytest.raises(DataError, match="decomposition records not found"):
        load_decomposition_dataset(str(folder / "nope.jsonl"))
    (folder / "bad.jsonl").write_text('{"image": \n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_decomposition_dataset(str(folder / "bad.jsonl"))
