"""Trainers (one ``x_trainer.py`` + ``x_config.py`` pair per stage)."""

from refiner_rl.trainers.sft_config import FlowSFTConfig
from refiner_rl.trainers.sft_trainer import FlowSFTTrainer

__all__ = ["FlowSFTConfig", "FlowSFTTrainer"]
