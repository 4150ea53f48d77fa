"""The metric interface: one plug-in per file, each a batched function of outputs and their records.

A metric has a ``name`` (its column in the table), a direction (``higher_is_better``: ↑ or ↓) and
``compute(outputs, records) -> Scored``: ``outputs`` are the candidate's images ``[B, 3, H, W]`` in [0, 1],
``records`` the collated batch they were made from (``draft``, ``reference``, ``mask``, ``target`` when the
data has it, ``prompt``, ``index``). ``Scored.values`` holds one value per record (``[B]``, or ``[B, K]`` for a
metric with ``parts``, e.g. VIEScore's SC, PQ and overall), NaN where the record was not scored; ``Scored.notes``
says why (``"no face detected"``, ``"no target"``, an error), so the evaluator counts skipped and failed
records per metric. A record that was not scored is left out of the mean, never counted as 0.

Metrics are built from recipe entries (a name, or a mapping with ``name`` and the class's options) through
:func:`build_metrics`; :func:`register_metric` adds a class to the registry.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from refiner_rl.errors import CheckpointError, ConfigError

_REGISTRY: dict[str, type[Metric]] = {}
# The shipped metrics, imported on first use so ``refiner-rl --help`` stays light.
_BUILTIN = {
    "masked_mse": "refiner_rl.metrics.masked_mse",
    "masked_psnr": "refiner_rl.metrics.masked_psnr",
    "change_outside": "refiner_rl.metrics.change_outside",
    "dreamsim": "refiner_rl.metrics.dreamsim",
    "dino": "refiner_rl.metrics.dino",
    "vlm_score": "refiner_rl.metrics.vlm_score",
    "viescore": "refiner_rl.metrics.viescore",
    "face_identity": "refiner_rl.metrics.face_identity",
}


@dataclass
class Scored:
    """Per-record values (NaN = not scored) and, per record, why it was not scored (``None`` when it was)."""

    values: torch.Tensor
    notes: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        self.values = torch.as_tensor(self.values, dtype=torch.float64)
        if not self.notes:
            self.notes = [None] * self.values.shape[0]


class Metric:
    """Base class of evaluation metrics (see the module docstring)."""

    kind: str = ""  # the registry name recipes use (``name:`` of a metric entry)
    name: str = "metric"  # the column label (instances set it from their options or ``label``)
    higher_is_better: bool = True
    parts: tuple[str, ...] = ()  # sub-values of one metric (columns ``name/part``); empty = one value
    part_higher_is_better: tuple[bool, ...] = ()
    required_fields: tuple[str, ...] = ()  # record fields without which a record is skipped

    @property
    def columns(self) -> list[tuple[str, bool]]:
        """``(column label, higher is better)`` of each value this metric gives."""
        if not self.parts:
            return [(self.name, self.higher_is_better)]
        ups = self.part_higher_is_better or (self.higher_is_better,) * len(self.parts)
        return [(f"{self.name}/{p}", up) for p, up in zip(self.parts, ups)]

    def describe(self) -> str:
        """One line for the table's notes (e.g. the judge's name); empty by default."""
        return ""

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        raise NotImplementedError

    def __call__(self, outputs: torch.Tensor, records: dict) -> Scored:
        """:meth:`compute` with the record fields checked: records lacking a required field are skipped with a note;
        an exception fails the whole batch for this metric (counted per record, never fatal)."""
        n = outputs.shape[0]
        width = max(1, len(self.parts))
        missing = [f for f in self.required_fields if records.get(f) is None]
        if missing:
            return Scored(torch.full((n, width) if self.parts else (n,), math.nan), [f"no {missing[0]}"] * n)
        try:
            out = self.compute(outputs, records)
        except Exception as err:  # noqa: BLE001 - one bad batch is counted as failed records, the run goes on
            why = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
            return Scored(torch.full((n, width) if self.parts else (n,), math.nan), [why] * n)
        if not isinstance(out, Scored):
            out = Scored(torch.tensor([math.nan if v is None else float(v) for v in out]))
        return out


@contextlib.contextmanager
def loading(name: str):
    """Inside: a model loader's :class:`CheckpointError` is raised again with ``metric <name>: `` in front."""
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(f"metric {name}: {err}") from err


def register_metric(cls: type[Metric]) -> type[Metric]:
    _REGISTRY[cls.kind] = cls
    return cls


def metric_class(kind: str) -> type[Metric]:
    if kind not in _REGISTRY and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown metric {kind!r}; known: {', '.join(sorted(set(_BUILTIN) | set(_REGISTRY)))}")
    return _REGISTRY[kind]


def build_metrics(specs: Sequence[str | dict | Metric]) -> list[Metric]:
    """Metric instances from recipe entries: ``"masked_psnr"`` or ``{name: dreamsim, region: crop, ...}``.
    Bad options raise :class:`ConfigError` naming the metric; missing weights raise the loader's
    :class:`~refiner_rl.errors.CheckpointError` (also naming the metric)."""
    out: list[Metric] = []
    for spec in specs:
        if isinstance(spec, Metric):
            out.append(spec)
            continue
        options = {"name": spec} if isinstance(spec, str) else dict(spec)
        kind = options.pop("name", None)
        if not kind:
            raise ConfigError(f"metric entry {spec!r} has no `name`")
        cls = metric_class(kind)
        try:
            out.append(cls(**options))
        except TypeError as err:
            raise ConfigError(f"metric {kind}: {err}") from err
        except ValueError as err:
            if isinstance(err, ConfigError) or type(err) is not ValueError:
                raise
            raise ConfigError(f"metric {kind}: {err}") from err
    labels = [c for m in out for c, _ in m.columns]
    dup = sorted({c for c in labels if labels.count(c) > 1})
    if dup:
        raise ConfigError(f"two metrics give the same column(s) {dup}: set `label` on one of them")
    return out
