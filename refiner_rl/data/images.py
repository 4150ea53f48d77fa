"""Decoding record images to 8-bit RGB (draft, reference, target) or 8-bit L (mask), whatever the file's mode.

Rules (every image goes through :func:`decode_image`):
- 16-bit and 32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled from [0, 65535] to
  [0, 255] as ``round(v / 257)``, never clipped; a value outside [0, 65535] is an error, and so is a 16-bit image
  whose values all lie in [0, 255] while not all zero (8-bit data in a 16-bit file: it would decode near black).
- float grey (``F``) must lie in [0, 1] (NaN is an error) and is scaled by 255.
- 16-bit RGB(A) PNGs are decoded by Pillow to 8 bits per channel (the high byte: within 1/255 of ``v / 257``).
- palette images (``P``, ``PA``) are expanded through their palette; a transparent palette entry counts as alpha.
- alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, palette transparency): an image is composited on
  ``alpha_background`` (``"white"`` by default, any Pillow colour such as ``"black"`` or ``"#808080"``), or with
  ``alpha_background="error"`` an image with a transparent pixel is rejected. A fully opaque alpha is dropped.
- masks are composited on black: a transparent pixel is outside the region, so an ``LA`` mask and a white image
  whose alpha draws the region both work. A mask pixel >= 128 (after this) is inside the region.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageColor

from refiner_rl.errors import DataError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def check_alpha_background(value: str) -> str:
    """``value`` if it is ``"error"`` or a colour Pillow knows, else a :class:`DataError`."""
    if value == "error":
        return value
    try:
        ImageColor.getrgb(value)
    except ValueError as e:
        raise DataError(
            f"alpha_background {value!r} is neither 'error' nor a colour (e.g. 'white', 'black', '#808080')"
        ) from e
    return value


def open_file(value: Any, *, base_dir: str | None, where: str) -> Image.Image:
    """The undecoded image (header read) of a path, bytes, a ``datasets`` image dict or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            if not value.get("bytes"):
                return open_file(value["path"], base_dir=base_dir, where=where)
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, (str, os.PathLike)):
            path = resolve_path(os.fspath(value), base_dir)
            if not os.path.exists(path):
                raise DataError(f"{where}: file not found: {path}")
            return Image.open(path)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
    raise DataError(f"{where}: expected an image path, bytes or image, got {type(value).__name__}")


def resolve_path(path: str, base_dir: str | None) -> str:
    return path if os.path.isabs(path) or not base_dir else os.path.join(base_dir, path)


def header_size(value: Any, *, base_dir: str | None, where: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    img = open_file(value, base_dir=base_dir, where=where)
    try:
        return img.size
    finally:
        if img is not value:
            img.close()


def _wide_grey_to_l(img: Image.Image, where: str) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: float image values span [{lo:g}, {hi:g}]; expected [0, 1]")
        return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise DataError(f"{where}: {img.mode} image values span [{lo}, {hi}]; expected 16-bit values in [0, 65535]")
    if 0 < hi <= 255:
        raise DataError(
            f"{where}: 16-bit image whose values span only [{lo}, {hi}] of 65535 (8-bit data in a 16-bit file "
            "would decode almost black); save it as 8-bit"
        )
    return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")  # round(v / 257)


def decode_image(img: Image.Image, *, mask: bool = False, alpha_background: str = "white", where: str = "image"):
    """8-bit RGB (or L for a mask) following the rules of the module docstring."""
    try:
        img.load()
    except Exception as e:
        raise DataError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
    if img.mode in _WIDE_GREY or img.mode == "F":
        img = _wide_grey_to_l(img, where)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            img = rgba.convert("RGB")
        else:
            background = "black" if mask else alpha_background
            if background == "error":
                raise DataError(
                    f"{where}: the image has transparent pixels and alpha_background is 'error'; "
                    "flatten it or set alpha_background to a colour such as 'white'"
                )
            base = Image.new("RGBA", rgba.size, ImageColor.getrgb(background)[:3] + (255,))
            img = Image.alpha_composite(base, rgba).convert("RGB")
    try:
        return img.convert("L" if mask else "RGB")
    except Exception as e:  # e.g. a mode Pillow cannot convert (LAB, HSV)
        raise DataError(f"{where}: cannot convert a {img.mode} image to {'L' if mask else 'RGB'} ({e})") from e


def load_image(
    value: Any, *, base_dir: str | None, where: str, mask: bool = False, alpha_background: str = "white"
) -> Image.Image:
    """Open and decode one image field (path, bytes, ``datasets`` image dict or PIL image)."""
    return decode_image(
        open_file(value, base_dir=base_dir, where=where), mask=mask, alpha_background=alpha_background, where=where
    )


def to_tensor(img: Image.Image):
    """8-bit PIL -> float tensor ``[C, H, W]`` in [0, 1]."""
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
