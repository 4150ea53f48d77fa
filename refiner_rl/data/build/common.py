"""What every stage of ``refiner-rl data build`` shares: the row protocol, PNG bytes, seeded randomness, ``map``.

Row protocol: a stage returns a ``datasets.Dataset`` whose rows carry ``_drop`` (``""`` for a kept row, else the
reason it is dropped, e.g. ``too_small``) and ``_why`` (a one-line message naming the source image); the runner
counts the reasons for the report and keeps the rows whose ``_drop`` is empty.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image

DROP = {"_drop": datasets.Value("string"), "_why": datasets.Value("string")}


@dataclass
class StageContext:
    """What a stage needs besides its input and the config: a scratch folder for ``map``'s Arrow files, the
    stage's fingerprint (given to ``map`` so it never hashes its arguments, e.g. an editor model), and ``editor``,
    a zero-argument factory of the editor the ``vae`` / ``regenerate`` operators run (given by the caller: the data
    layer builds no model itself)."""

    name: str
    work_dir: str
    fingerprint: str
    editor: Callable[[], object] | None = None

    def map(self, ds: datasets.Dataset, fn, *, step: str, num_proc: int | None = None, **kwargs) -> datasets.Dataset:
        """``ds.map(fn, ...)`` writing to the scratch folder, with a progress bar named after the stage."""
        return ds.map(
            fn,
            num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > 1 else None,
            cache_file_name=os.path.join(self.work_dir, f"{self.name}-{step}.arrow"),
            new_fingerprint=f"{self.fingerprint}-{step}",
            desc=f"{self.name}: {step}",
            **kwargs,
        )


def kept(extra: dict | None = None) -> dict:
    return {**(extra or {}), "_drop": "", "_why": ""}


def dropped(reason: str, why: str, empty: dict) -> dict:
    """A dropped row: the stage's empty values for its columns, with the reason and message."""
    return {**empty, "_drop": reason, "_why": " ".join(str(why).split())}


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def from_png(data: bytes, mask: bool = False) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if mask else "RGB")


def to_array(img: Image.Image) -> np.ndarray:
    """8-bit image -> float32 array in [0, 1] (``[H, W, 3]`` or ``[H, W]``)."""
    return np.asarray(img, dtype=np.float32) / 255.0


def from_array(arr: np.ndarray, mask: bool = False) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L" if mask else "RGB")


def record_rng(seed: int, stage: str, key: str) -> np.random.Generator:
    """The random generator of one record in one stage: the same seed, stage and key give the same draws, whatever
    the number of processes or the order rows are visited in."""
    return np.random.default_rng([int(seed), zlib.crc32(stage.encode()), zlib.crc32(key.encode())])
