"""The SDE window: which sampling steps are stochastic and trained; the others run as ODE under no_grad.

Steps are indexed 0..num_steps-1; step i goes sigmas[i] -> sigmas[i + 1], so step 0 is the noisiest.
The last step (num_steps - 1, nearly clean) is never in the window: its likelihood overflows.
A window of a few high-noise steps (Flow-GRPO-Fast, MixGRPO) cuts training compute by large factors.

| mode    | window start at iteration k                                                          |
|---------|--------------------------------------------------------------------------------------|
| fixed   | ``start``                                                                            |
| sliding | ``start + (k mod n) * stride``, n = the number of such starts in [start, max_start]   |
| random  | uniform in ``[start, max_start]``, drawn from ``generator``                           |

Sliding is MixGRPO's window: one stride per iteration towards low noise, then back to ``start``.
``max_start`` defaults to ``num_steps - 1 - size``, the last start that keeps the window off the final step.
Every mode is a pure function of its arguments, so a resumed run needs no window state: only the iteration
and, for ``random``, the generator's state (part of the trainer's RNG checkpoint). Under data parallelism,
seed the generator identically on every rank so that all ranks train the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

WindowMode = Literal["fixed", "sliding", "random"]
WINDOW_MODES = get_args(WindowMode)


def _start_range(num_steps: int, size: int, start: int, mode: str, stride: int, max_start: int | None):
    """Validate the window arguments; return ``(start, max_start)``, the range of allowed window starts."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"Unknown SDE window mode {mode!r}; known: {', '.join(WINDOW_MODES)}.")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps}: GRPO needs at least 2 sampling steps; the last one is never trained.")
    if not 1 <= size <= num_steps - 1:
        raise ValueError(
            f"SDE window size={size} does not fit num_steps={num_steps}: the last, nearly clean step is "
            f"never trained, so size must be between 1 and {num_steps - 1}. "
            "Lower `size` or raise `num_steps`."
        )
    last_start = num_steps - 1 - size
    if max_start is None:
        max_start = last_start
    elif not 0 <= max_start <= last_start:
        raise ValueError(
            f"SDE window max_start={max_start} is out of range: with num_steps={num_steps} and size={size} "
            f"it must be between 0 and {last_start} (the window may not reach the last step). "
            "Lower `max_start` or `size`."
        )
    limit = last_start if mode == "fixed" else max_start
    if not 0 <= start <= limit:
        raise ValueError(
            f"SDE window start={start} is out of range for mode={mode!r}: it must be between 0 and {limit} "
            f"(num_steps={num_steps}, size={size}, max_start={max_start}). Lower `start`."
        )
    if stride < 1:
        raise ValueError(f"SDE window stride={stride} must be >= 1. Set `stride` to a positive integer.")
    return start, max_start


def sde_window(
    num_steps: int,
    size: int,
    start: int = 0,
    mode: str = "fixed",
    iteration: int = 0,
    stride: int = 1,
    max_start: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Indices of the stochastic, trained steps at ``iteration``: ``list(range(w, w + size))`` with the window
    start ``w`` given by ``mode`` (see the module table). ``random`` draws from ``generator`` (the global RNG
    when None), so a seeded generator gives the same windows.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}.")
    lo, hi = _start_range(num_steps, size, start, mode, stride, max_start)
    if mode == "fixed":
        w = lo
    elif mode == "sliding":
        positions = (hi - lo) // stride + 1
        w = lo + (iteration % positions) * stride
    else:
        device = generator.device if generator is not None else "cpu"
        w = int(torch.randint(lo, hi + 1, (1,), generator=generator, device=device).item())
    return list(range(w, w + size))


@dataclass(frozen=True)
class WindowSchedule:
    """An SDE window, checked once when built. Pure: ``steps(iteration)`` depends only on its arguments.

    Parameters:
        num_steps: sampling steps per rollout.
        size: number of trained steps (1-4 in Flow-GRPO-Fast / MixGRPO).
        start: first window start (the only one in ``fixed`` mode); 0 is the noisiest step.
        mode: ``fixed``, ``sliding`` or ``random``.
        stride: steps the ``sliding`` window moves per iteration.
        max_start: last allowed start for ``sliding`` / ``random``; default ``num_steps - 1 - size``.
    """

    num_steps: int
    size: int
    start: int = 0
    mode: str = "fixed"
    stride: int = 1
    max_start: int | None = None

    def __post_init__(self):
        _start_range(self.num_steps, self.size, self.start, self.mode, self.stride, self.max_start)

    def steps(self, iteration: int = 0, generator: torch.Generator | None = None) -> list[int]:
        """Indices of the trained steps at ``iteration`` (see ``sde_window``)."""
        return sde_window(
            self.num_steps,
            self.size,
            start=self.start,
            mode=self.mode,
            iteration=iteration,
            stride=self.stride,
            max_start=self.max_start,
            generator=generator,
        )
