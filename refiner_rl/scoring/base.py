"""The reward interface every plug-in implements.

A reward follows TRL's reward-function signature with images as completions::

    reward(prompts, completions, **columns) -> list[float | None]

``completions`` are the sampled images; ``columns`` carry the record fields named in
``required_fields`` (``draft``, ``reference``, ``target``, ``mask``; ``prompts`` are always given).
Images are float tensors ``[3, H, W]`` in ``[0, 1]`` (masks ``[1, H, W]``, 1 = region to refine);
PIL images are accepted too and converted with :func:`as_image_tensor`.

``None`` means "this sample cannot be scored". The trainer excludes it from the group statistics and
counts it; it is never turned into 0.0 (that would fake a bad sample).

A reward scores each sample on its own (a pairwise judge compares the sample with a column image such as the
draft, not with the other samples of its group). How much a reward counts is not the plug-in's business: the
weights are the recipe's (``weight:`` per entry, or TRL's ``reward_weights``), see
:func:`refiner_rl.scoring.registry.split_weights`. Plain TRL reward functions are wrapped by
:class:`refiner_rl.scoring.functions.FunctionReward`; :func:`refiner_rl.scoring.batch.score_batch` scores a
batch with a list of rewards.

Reward-gradient training (``refiner-rl refl``) back-propagates a reward into the image: a reward that allows it
sets ``differentiable = True`` and implements :meth:`Reward.score_tensors`, whose values equal :meth:`Reward.score`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import torch

KNOWN_FIELDS = ("prompt", "draft", "reference", "target", "mask")
# The column reward-gradient training adds to ``score_tensors``: the reference policy's image for the same condition
# (``x_ref``, no gradient), which a pairwise judge compares the sample with.
BASELINE_FIELD = "baseline"


def as_image_tensor(image: Any, channels: int = 3) -> torch.Tensor:
    """Return ``image`` as a float tensor ``[C, H, W]`` in ``[0, 1]``.

    Accepts a tensor (``[C, H, W]`` or ``[H, W]``), a PIL image, or a numpy array ``[H, W(, C)]``
    with values in ``[0, 255]`` (uint8) or ``[0, 1]`` (float).
    """
    if isinstance(image, torch.Tensor):
        t = image
    else:
        import numpy as np

        arr = np.asarray(image.convert("RGB" if channels == 3 else "L") if hasattr(image, "convert") else image)
        t = torch.from_numpy(arr.copy())
        if t.ndim == 3:
            t = t.permute(2, 0, 1)
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
    if t.ndim == 2:
        t = t.unsqueeze(0)
    t = t.float()
    if t.shape[0] != channels:
        if channels == 1:
            t = t.mean(0, keepdim=True)
        elif t.shape[0] == 1:
            t = t.expand(channels, -1, -1)
    return t


def to_pil(image: Any, mode: str = "RGB"):
    """A PIL image (``RGB``, or ``L`` for a mask) from a ``[C, H, W]`` tensor in [0, 1] (or anything
    :func:`as_image_tensor` takes); a PIL image in that mode is returned as is. Values are rounded to uint8."""
    from PIL import Image

    if isinstance(image, Image.Image) and image.mode == mode:
        return image
    t = as_image_tensor(image, channels=1 if mode == "L" else 3).detach().float().cpu().clamp(0, 1)
    arr = (t.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)


class Reward:
    """Base class of reward plug-ins.

    Subclasses set ``name`` and ``required_fields`` and implement :meth:`score`, which returns one value
    per completion (``None`` where a sample cannot be scored). Rewards that give spatial credit also
    implement :meth:`score_maps`. Rewards that wait on I/O (a judge server) may implement
    ``async def ascore`` and return ``True`` from :attr:`is_async`: :func:`~refiner_rl.scoring.batch.score_batch`
    then awaits them concurrently with the batch's other async rewards, and a deadline cancels them cleanly.
    Constructor keyword arguments are the plug-in's options; they come from the recipe's ``rewards:`` entry.
    """

    name: ClassVar[str] = ""
    required_fields: ClassVar[tuple[str, ...]] = ()
    # Fields used when the data has them (e.g. ``mask``: without it the whole image is the region).
    optional_fields: ClassVar[tuple[str, ...]] = ()
    provides_maps: ClassVar[bool] = False
    # True when :meth:`score_tensors` is implemented: the reward can be back-propagated into the image.
    differentiable: ClassVar[bool] = False

    def __init__(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or torch.float32

    # -- to implement -------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], completions: Sequence[torch.Tensor], **columns) -> list[float | None]:
        raise NotImplementedError

    def score_maps(
        self, prompts: Sequence[str], completions: Sequence[torch.Tensor], **columns
    ) -> tuple[list[float | None], list[torch.Tensor | None]]:
        """Scores plus one per-patch map ``[h, w]`` per completion (the map covers the whole image on a
        regular grid). Rewards without spatial credit return ``None`` maps."""
        return self.score(prompts, completions, **columns), [None] * len(completions)

    def score_tensors(self, images: torch.Tensor, columns: dict) -> torch.Tensor:
        """Scores ``[B]`` of ``images`` ``[B, 3, H, W]`` in [0, 1] as a differentiable function of them (higher is
        better; NaN where a sample cannot be scored, where :meth:`score` gives ``None``), equal to :meth:`score`'s
        values. ``columns`` map a field to one entry per image, a list or a stacked tensor: ``prompt``, the record's
        images (``draft``, ``reference``, ``target``, ``mask``) and, from the reward-gradient trainer,
        :data:`BASELINE_FIELD` (the reference policy's images). Rewards that implement it set ``differentiable``."""
        raise NotImplementedError(
            f"reward {self.name or type(self).__name__!r} is not differentiable (differentiable = False): it has "
            "no score_tensors(images, columns) to back-propagate"
        )

    # -- shared behaviour ---------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> Reward:
        self.device = torch.device(device)
        return self

    async def ascore(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        """The async form of :meth:`score`, for rewards with :attr:`is_async` true."""
        raise NotImplementedError(f"{type(self).__name__} has no async score")

    @property
    def is_async(self) -> bool:
        """Whether :func:`~refiner_rl.scoring.batch.score_batch` should await :meth:`ascore` instead of calling
        :meth:`score` (true when a subclass overrides ``ascore``)."""
        return type(self).ascore is not Reward.ascore

    def __call__(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        scores = self.score(prompts, completions, **columns)
        return [clean_score(s) for s in scores]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def clean_score(value: Any) -> float | None:
    """Turn NaN/inf or non-numbers into ``None``; keep finite floats."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- helpers shared by reward plug-ins -----------------------------------------------------------------


def column_value(columns: dict, field: str, index: int) -> Any:
    """``columns[field][index]``, or ``None`` when the batch has no such column (columns are aligned with the
    completions; a shorter column is a data bug and raises)."""
    values = columns.get(field)
    return None if values is None else values[index]


def required_value(columns: dict, field: str, index: int, reward: str) -> Any:
    """``columns[field][index]``; a ValueError naming the reward, sample and field when it is missing."""
    value = column_value(columns, field, index)
    if value is None:
        raise ValueError(f"reward {reward!r}: sample {index} has no {field!r} (columns given: {sorted(columns)})")
    return value


def column_batch(
    columns: dict, field: str, like: torch.Tensor, reward: str, channels: int = 3, required: bool = True
) -> torch.Tensor | None:
    """``columns[field]`` as one float tensor ``[B, C, H, W]`` on ``like``'s device (a stacked tensor, or a list of
    per-sample images as :func:`as_image_tensor` takes), with no gradient. ``None`` when the column is absent and
    not ``required``; a ValueError naming the reward and field when it is required."""
    values = columns.get(field)
    if values is None:
        if required:
            raise ValueError(f"reward {reward!r}: the batch has no {field!r} column (columns given: {sorted(columns)})")
        return None
    if not isinstance(values, torch.Tensor):
        values = torch.stack([as_image_tensor(v, channels) for v in values])
    if values.shape[0] != like.shape[0]:
        raise ValueError(f"reward {reward!r}: {values.shape[0]} {field!r} entries for {like.shape[0]} images")
    return values.detach().to(like.device, torch.float32)


def check_same_size(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, reward: str) -> None:
    """Raise a ValueError naming both fields when two images differ in height/width (rewards never resize
    silently: a size mismatch is a data bug)."""
    if tuple(a.shape[-2:]) != tuple(b.shape[-2:]):
        raise ValueError(
            f"reward {reward!r}: {name_a} is {tuple(a.shape[-2:])} (H, W) but {name_b} is "
            f"{tuple(b.shape[-2:])}; they must have the same size"
        )


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Frozen scorer network: ``eval()`` (a model built from a config starts in training mode, with dropout
    on) and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Build frozen networks (reward models) here so DeepSpeed ZeRO-3 does not partition them.

    Under ZeRO-3, ``transformers``' ``from_pretrained`` (and accelerate-prepared model construction) read a
    global DeepSpeed config and build parameters inside ``deepspeed.zero.Init``, which shards them across ranks;
    a frozen scorer called outside the engine then sees empty shards. This context disables that for its
    duration, the same way diffusers' training scripts build their VAE and text encoders
    (``deepspeed_plugin.zero3_init_context_manager(enable=False)``), and also clears the ``transformers``
    weak reference to the DeepSpeed config. Without DeepSpeed it does nothing.
    """
    with contextlib.ExitStack() as stack:
        try:
            from accelerate.state import AcceleratorState, is_initialized

            if is_initialized():
                plugin = AcceleratorState().deepspeed_plugin
                if plugin is not None:
                    stack.enter_context(plugin.zero3_init_context_manager(enable=False))
        except ImportError:  # accelerate is a dependency, but keep rewards usable without it
            pass
        hf_ds = None
        saved_ref = None
        try:
            from transformers.integrations import deepspeed as hf_ds

            if hf_ds.is_deepspeed_zero3_enabled():
                saved_ref = hf_ds._hf_deepspeed_config_weak_ref
                hf_ds.unset_hf_deepspeed_config()
        except ImportError:
            hf_ds = None
        try:
            yield
        finally:
            if hf_ds is not None and saved_ref is not None:
                hf_ds._hf_deepspeed_config_weak_ref = saved_ref


# -- the safe call the trainers use ---------------------------------------------------------------------


class ScoreResult(NamedTuple):
    """What :func:`score_safely` returns; unpacks as ``scores, maps, n_failed, error``."""

    scores: list[float | None]
    maps: list[torch.Tensor | None]
    n_failed: int
    error: str | None


def checked_result(n: int, raw_scores: Any, raw_maps: Any = None) -> ScoreResult:
    """A reward's raw output as a :class:`ScoreResult`: NaN/inf and non-numbers become ``None``, a map is kept
    (float32, CPU) only where its score is not ``None``. A ValueError when there are not ``n`` scores/maps."""
    raw_scores = list(raw_scores)
    raw_maps = [None] * n if raw_maps is None else list(raw_maps)
    if len(raw_scores) != n or len(raw_maps) != n:
        raise ValueError(f"returned {len(raw_scores)} scores and {len(raw_maps)} maps for {n} completions")
    scores = [clean_score(s) for s in raw_scores]
    maps = [
        None if s is None or m is None else torch.as_tensor(m, dtype=torch.float32).detach().cpu()
        for s, m in zip(scores, raw_maps)
    ]
    return ScoreResult(scores, maps, sum(s is None for s in scores), None)


def failed_result(n: int, error: BaseException | str) -> ScoreResult:
    """Every sample ``None``; ``error`` as ``"ExceptionType: message"``."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ScoreResult([None] * n, [None] * n, n, message)


def score_safely(
    reward: Reward, prompts: Sequence[str], completions: Sequence[Any], *, with_maps: bool = True, **columns
) -> ScoreResult:
    """Score a batch with one ``reward`` and never raise (it logs nothing: the caller logs once per batch).

    - An exception inside the reward gives every sample ``None`` and ``error`` = ``"ExceptionType: message"``.
    - NaN/inf (or non-numbers) become ``None``; a map is dropped where its score is ``None``.
    - A reward returning the wrong number of scores counts as a failure of the whole batch.

    ``maps`` come from :meth:`Reward.score_maps` when ``with_maps`` and the reward sets ``provides_maps``
    (float tensors ``[h, w]``, NaN where a patch has no score), otherwise they are all ``None``. ``n_failed``
    counts the samples left without a score, whatever the reason. Several rewards at once, async ones
    concurrently: :func:`refiner_rl.scoring.batch.score_batch`.
    """
    n = len(completions)
    try:
        if with_maps and getattr(reward, "provides_maps", False):
            return checked_result(n, *reward.score_maps(prompts, completions, **columns))
        return checked_result(n, reward(prompts, completions, **columns))
    except Exception as e:  # noqa: BLE001 - a reward must never crash a run
        return failed_result(n, e)
