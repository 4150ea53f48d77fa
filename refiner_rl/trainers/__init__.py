"""Trainers (one ``x_trainer.py`` + ``x_config.py`` pair per stage). Imported on first use, so importing a
config module stays cheap."""

from __future__ import annotations

from refiner_rl._lazy import lazy_exports

_EXPORTS = {
    "FlowSFTConfig": "refiner_rl.trainers.sft_config",
    "FlowSFTTrainer": "refiner_rl.trainers.sft_trainer",
    "FlowGRPOConfig": "refiner_rl.trainers.grpo_config",
    "FlowGRPOTrainer": "refiner_rl.trainers.grpo_trainer",
    "FlowReFLConfig": "refiner_rl.trainers.refl_config",
    "FlowReFLTrainer": "refiner_rl.trainers.refl_trainer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
