"""refiner-rl: SFT and GRPO for flow-matching image editors that refine a draft from a reference image.

The public classes are importable from here (``from refiner_rl import FlowGRPOTrainer``); each loads on first use,
so ``import refiner_rl`` itself imports neither torch nor transformers.
"""

from __future__ import annotations

from refiner_rl._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FlowGRPOConfig": "refiner_rl.trainers.grpo_config",
    "FlowGRPOTrainer": "refiner_rl.trainers.grpo_trainer",
    "FlowReFLConfig": "refiner_rl.trainers.refl_config",
    "FlowReFLTrainer": "refiner_rl.trainers.refl_trainer",
    "FlowSFTConfig": "refiner_rl.trainers.sft_config",
    "FlowSFTTrainer": "refiner_rl.trainers.sft_trainer",
    "KontextPolicy": "refiner_rl.policies.kontext",
    "FillPolicy": "refiner_rl.policies.fill",
    "EditorPolicy": "refiner_rl.policies.base",
    "ModelArguments": "refiner_rl.configs",
    "DataArguments": "refiner_rl.configs",
    "build_policy": "refiner_rl.configs",
    "TripletDataset": "refiner_rl.data",
    "collate_triplets": "refiner_rl.data",
    "Reward": "refiner_rl.scoring",
    "FunctionReward": "refiner_rl.scoring",
    "register_reward": "refiner_rl.scoring",
    "build_reward_funcs": "refiner_rl.scoring",
    "score_batch": "refiner_rl.scoring",
    "evaluate": "refiner_rl.evaluation",
    "sample_images": "refiner_rl.sampling",
    "RefinerPipeline": "refiner_rl.pipeline",
    "load_refiner": "refiner_rl.refine",
    "UserError": "refiner_rl.errors",
    "ConfigError": "refiner_rl.errors",
    "DataError": "refiner_rl.errors",
    "CheckpointError": "refiner_rl.errors",
    "RewardError": "refiner_rl.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
