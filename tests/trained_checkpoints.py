"""Session fixtures that train tiny checkpoints once for every test module that needs one (``refiner-rl eval`` and
``refiner-rl refine`` tests): ``held_out`` (a folder of 8 triplets) and ``trained`` (an SFT output and a GRPO LoRA on
it). tests/conftest.py imports them, so the session trains once.

The triplets: the synthetic generator's, 16 px, with the draft's region replaced by its negative (a draft clearly
wrong inside the mask and right outside, as the data pipeline's filter keeps); see tests/test_eval.py for why.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from refiner_rl.data import TripletDataset, load_records, write_synthetic_dataset
from tests.helpers import small_policy

SIZE, RECORDS, SFT_STEPS, GRPO_STEPS = 16, 8, 90, 4


def write_wrong_draft_dataset(folder: str, n: int, seed: int) -> str:
    """Synthetic triplets on disk (records.jsonl + PNGs) whose drafts are the target's negative inside the mask."""
    path = write_synthetic_dataset(folder, n, seed=seed, size=SIZE)
    for row in map(json.loads, open(path).read().splitlines()):
        draft_path = os.path.join(folder, row["draft"])
        draft = np.asarray(Image.open(draft_path).convert("RGB")).copy()
        target = np.asarray(Image.open(os.path.join(folder, row["target"])).convert("RGB"))
        inside = np.asarray(Image.open(os.path.join(folder, row["mask"])).convert("L")) > 127
        draft[inside] = 255 - target[inside]
        Image.fromarray(draft).save(draft_path)
    return folder


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> str:
    return write_wrong_draft_dataset(str(tmp_path_factory.mktemp("held_out")), RECORDS, seed=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, held_out):
    """Train once per session: SFT (full fine-tuning of the small tiny editor) on 64 such triplets, then a
    few GRPO steps of a LoRA on top with EMA; the held-out folder holds 8 other triplets."""
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig
    from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer

    root = tmp_path_factory.mktemp("eval")
    train = TripletDataset(load_records(write_wrong_draft_dataset(str(root / "train"), 64, seed=0)), None, multiple=4)
    common = dict(report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, logging_steps=1000)
    policy = small_policy()
    sft = FlowSFTConfig(
        output_dir=str(root / "sft"),
        max_steps=SFT_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        caption_dropout=0.0,
        mask_weight=4.0,
        **common,
    )
    trainer = FlowSFTTrainer(policy, sft, train)
    trainer.train()
    trainer.save_model()
    policy.add_lora(rank=4)
    grpo = FlowGRPOConfig(
        output_dir=str(root / "grpo"),
        max_steps=GRPO_STEPS,
        per_device_train_batch_size=8,
        num_generations=4,
        num_inference_steps=4,
        sde_window_size=2,
        start_sigma=0.5,
        paste_back=True,
        learning_rate=1e-3,
        beta=0.0,
        ema_decay=0.5,
        rewards=[{"name": "masked_pixel", "patch_size": 4}],
        **common,
    )
    g = FlowGRPOTrainer(policy, args=grpo, train_dataset=train)
    g.train()
    g.save_model()
    return {"sft": str(root / "sft"), "grpo": str(root / "grpo")}
