"""Plain TRL reward functions the reward tests name by dotted path (``tests.scoring_functions.brightness``)."""

from __future__ import annotations

import asyncio

import torch

SEEN: dict[str, object] = {}  # what the last call received, for the tests to inspect


def brightness(prompts, completions, scale: float = 1.0, **kwargs):
    """``scale`` x mean grey level of each PIL completion in [0, 1]; ``None`` for an all-black image."""
    SEEN["brightness"] = {"completions": completions, **kwargs}
    out = []
    for image in completions:
        grey = torch.tensor(list(image.convert("L").tobytes()), dtype=torch.float64)
        mean = float(grey.mean()) / 255.0
        out.append(None if mean == 0 else scale * mean)
    return out


def masked_mean(prompts, completions: list[torch.Tensor], mask, **kwargs):
    """Mean of each tensor completion inside its mask (tensors asked for by the annotation)."""
    SEEN["masked_mean"] = {"completions": completions, "mask": mask, **kwargs}
    return [float((c * m).sum() / (3 * m.sum())) for c, m in zip(completions, mask)]


def prompt_length(prompts, completions, **kwargs):
    return [float(len(p)) for p in prompts]


prompt_length.wants_tensors = True  # tensors asked for by the attribute


class Rendezvous:
    """Two async reward functions that can only both finish when they run at the same time: each waits for the
    other to have started. ``log`` records the order of starts and ends."""

    def __init__(self):
        self.log: list[str] = []
        self.started = {"left": asyncio.Event(), "right": asyncio.Event()}

    def make(self, side: str, other: str, value: float):
        async def fn(prompts, completions, **kwargs):
            self.log.append(f"{side} start")
            self.started[side].set()
            await self.started[other].wait()
            self.log.append(f"{side} end")
            return [value] * len(completions)

        fn.__name__ = f"rendezvous_{side}"
        return fn


async def never_answers(prompts, completions, **kwargs):
    await asyncio.Event().wait()


def difficulty(prompts, completions, difficulty, **kwargs):
    """The records' own ``difficulty`` field (any JSONL column reaches a function), ``None`` where missing."""
    return [None if d is None else float(d) for d in difficulty]
