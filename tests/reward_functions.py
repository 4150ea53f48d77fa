"""Plain TRL-style reward functions ``f(prompts, completions, **kwargs)`` used by the GRPO API tests, named in
recipes by dotted path (``tests.reward_functions.brightness``). Completions arrive as PIL images."""

from __future__ import annotations

import numpy as np

CALLS = {"async_brightness": []}  # the optimizer step (TRL's trainer_state) of each call


def brightness(prompts, completions, **kwargs):
    """Mean pixel value of each completion in [0, 1]."""
    return [float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in completions]


def odd_records_only(prompts, completions, index, **kwargs):
    """``brightness`` for samples of odd records; ``None`` (cannot score) for even ones."""
    return [b if int(i) % 2 else None for b, i in zip(brightness(prompts, completions), index)]


async def async_brightness(prompts, completions, **kwargs):
    CALLS["async_brightness"].append(kwargs["trainer_state"].global_step)
    return brightness(prompts, completions)


def always_fails(prompts, completions, **kwargs):
    raise RuntimeError("scorer offline")
