"""refiner-rl: SFT and GRPO for flow-matching image editors that refine a draft from a reference image."""

__version__ = "0.1.0"
