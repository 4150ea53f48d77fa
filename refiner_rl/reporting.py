"""Reporting helpers shared by training and evaluation: W&B set-up (offline without an API key) and PNG image grids.

Neutral ground: :mod:`refiner_rl.trainers` and :mod:`refiner_rl.evaluation` both use these, and neither imports the
other for them."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def reports_to_wandb(report_to) -> bool:
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "wandb" in targets or "all" in targets


def setup_wandb_env(report_to) -> None:
    """Log to W&B offline when no API key is configured, so a run never blocks on a login prompt."""
    if reports_to_wandb(report_to):
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            logger.info("no W&B API key found: logging offline (sync later with `wandb sync`)")


def save_grid(path: str, rows: list[list[torch.Tensor]], scale: int = 4) -> None:
    """Rows of ``[3, H, W]`` images in [0, 1] -> one PNG (nearest upscaling so fine detail stays visible).
    Images of a row may differ in height (the reference): each is padded at the bottom to the row's tallest."""
    from PIL import Image

    lines = []
    for row in rows:
        row = [im.detach().cpu() for im in row]  # a trainer's rows may mix CPU copies and device tensors
        h = max(im.shape[1] for im in row)
        lines.append(
            torch.cat([torch.nn.functional.pad(im.float().clamp(0, 1), (0, 0, 0, h - im.shape[1])) for im in row], 2)
        )
    w = max(line.shape[2] for line in lines)
    grid = torch.cat([torch.nn.functional.pad(line, (0, w - line.shape[2])) for line in lines], dim=1)
    arr = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
