"""Plain TRL reward functions as rewards.

A TRL reward function is any callable ``f(prompts, completions, **kwargs) -> list[float | None]``, sync or
``async def``. :class:`FunctionReward` wraps one so that it works wherever a :class:`Reward` does (a recipe
entry by dotted path, ``reward_funcs=[...]``, ``refiner-rl rewards score``):

- ``completions`` are PIL RGB images, or float tensors ``[3, H, W]`` in ``[0, 1]`` when the function asks for
  tensors: its ``completions`` parameter is annotated ``torch.Tensor`` or ``list[torch.Tensor]``, or the
  function has the attribute ``wants_tensors = True``;
- ``kwargs`` carry every column of the batch, aligned with the completions: the image fields ``draft``,
  ``reference``, ``target`` (PIL RGB or tensors ``[3, H, W]``) and ``mask`` (PIL ``L`` or tensors ``[1, H, W]``,
  1 = region), and any other column (``index``: equal index = same group) and extra as given (e.g. TRL's
  ``trainer_state``);
- ``None`` in the returned list means the sample could not be scored (excluded, never 0).

Options of a recipe entry (``{name: my_pkg.rewards.brightness, scale: 2.0}``) are keyword parameters of the
function, bound at every call. The reward's name is the function's ``__name__``.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refiner_rl.scoring import loop
from refiner_rl.scoring.base import Reward, as_image_tensor, to_pil

IMAGE_COLUMNS = {"draft": "RGB", "reference": "RGB", "target": "RGB", "mask": "L"}


def is_async_callable(fn: Any) -> bool:
    """``async def`` functions, partials of them and objects whose ``__call__`` is ``async def``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    )


def function_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def wants_tensors(fn: Any) -> bool:
    """Whether ``fn`` takes its completions as tensors (see the module docstring)."""
    flag = getattr(fn, "wants_tensors", None)
    if flag is not None:
        return bool(flag)
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not inspect.isroutine(target):  # a callable object: read its __call__
        target = type(target).__call__
    try:
        hint = typing.get_type_hints(target).get("completions")
    except Exception:  # noqa: BLE001 - unresolvable string annotations: read them as text
        hint = getattr(target, "__annotations__", {}).get("completions")
    if hint is None:
        return False
    if isinstance(hint, str):
        return "Tensor" in hint
    return hint is torch.Tensor or torch.Tensor in typing.get_args(hint)


def keyword_parameters(fn: Any) -> tuple[list[str], bool]:
    """Names ``fn`` takes by keyword (besides prompts and completions) and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("prompts", "completions")
    ]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


class FunctionReward(Reward):
    """A plain TRL reward function (sync or async) as a :class:`Reward`; ``options`` are bound at every call."""

    def __init__(self, fn: Callable[..., Any], *, device: Any = None, dtype: Any = None, **options):
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable, got {fn!r}")
        super().__init__(device=device, dtype=dtype)
        accepted, takes_any = keyword_parameters(fn)
        unknown = [k for k in options if k not in accepted]
        if unknown and not takes_any:
            raise ValueError(
                f"reward function {function_name(fn)!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its keyword parameters: {', '.join(accepted) or '(none)'}"
            )
        self.fn, self.options = fn, options
        self.name = function_name(fn)
        self.required_fields = tuple(getattr(fn, "required_fields", ()))
        self.wants_tensors = wants_tensors(fn)
        self._async = is_async_callable(fn)

    @property
    def is_async(self) -> bool:
        return self._async

    def _arguments(self, completions: Sequence[Any], columns: dict) -> tuple[list[Any], dict]:
        if self.wants_tensors:
            comps = [None if c is None else as_image_tensor(c) for c in completions]
        else:
            comps = [None if c is None else to_pil(c) for c in completions]
        kwargs = dict(columns)
        for field, mode in IMAGE_COLUMNS.items():
            values = kwargs.get(field)
            if values is None or isinstance(values, (str, bytes)):
                continue
            if self.wants_tensors:
                channels = 1 if mode == "L" else 3
                kwargs[field] = [None if v is None else as_image_tensor(v, channels) for v in values]
            else:
                kwargs[field] = [None if v is None else to_pil(v, mode) for v in values]
        kwargs.update(self.options)
        return comps, kwargs

    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        if self._async:
            return loop.run(self.ascore(prompts, completions, **columns))
        comps, kwargs = self._arguments(completions, columns)
        return list(self.fn(prompts=list(prompts), completions=comps, **kwargs))

    async def ascore(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        comps, kwargs = self._arguments(completions, columns)
        if self._async:
            return list(await self.fn(prompts=list(prompts), completions=comps, **kwargs))
        return list(self.fn(prompts=list(prompts), completions=comps, **kwargs))

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r}, async={self._async}, tensors={self.wants_tensors})"
