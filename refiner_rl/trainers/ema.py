"""Exponential moving average of the trained weights (an anchor's defence against reward hacking)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers import TrainerCallback


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` over the trainable parameters of ``module``."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        with _gathered([params[n] for n in self.names]):  # whole tensors under ZeRO-3 (every rank keeps the EMA)
            for n in self.names:
                self.shadow[n].mul_(self.decay).add_(params[n].detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Temporarily swap the EMA weights into ``module``."""
        params = dict(module.named_parameters())
        trained = [params[n] for n in self.names]
        with torch.no_grad(), _gathered(trained, modify=True):
            backup = {n: params[n].detach().clone() for n in self.names}
            for n in self.names:
                params[n].copy_(self.shadow[n].to(params[n].dtype))
        try:
            yield
        finally:
            with torch.no_grad(), _gathered(trained, modify=True):
                for n in self.names:
                    params[n].copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.shadow = {n: state[n].float().clone() for n in self.names}


EMA_FILE = "ema_state.safetensors"  # the shadow weights in a checkpoint, for resume


def save_ema_state(ema: EMA, folder: str) -> None:
    """Write the shadow weights to ``folder/ema_state.safetensors`` (through a temporary file and a rename, so a
    checkpoint never holds half of it)."""
    from safetensors.torch import save_file

    tmp = os.path.join(folder, EMA_FILE + ".tmp")
    save_file({n: t.contiguous() for n, t in ema.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(folder, EMA_FILE))


def ema_state_path(folder: str) -> str | None:
    """The shadow-weights file of a checkpoint folder, ``None`` if it has none."""
    path = os.path.join(folder, EMA_FILE)
    return path if os.path.isfile(path) else None


def load_ema_checkpoint(ema: EMA, folder: str, remedy: str) -> None:
    """Restore ``ema`` from a checkpoint folder; a CheckpointError naming the missing file and ``remedy`` if the
    folder holds no shadow weights."""
    path = ema_state_path(folder)
    if path is None:
        from refiner_rl.errors import CheckpointError

        raise CheckpointError(f"EMA is on but {os.path.join(folder, EMA_FILE)} is missing: {remedy}")
    load_ema_state(ema, path)


def load_ema_state(ema: EMA, path: str) -> None:
    """Load shadow weights written by :func:`save_ema_state` (safetensors only)."""
    from safetensors.torch import load_file

    ema.load_state_dict(load_file(path, device="cpu"))


def _gathered(params: list[nn.Parameter], modify: bool = False):
    """Whole tensors of ZeRO-3 partitioned ``params`` inside the context (a no-op otherwise). ``modify``: writes made
    on rank 0 are partitioned back on exit (every rank writes the same values here, the EMA being replicated)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


class EMACallback(TrainerCallback):
    """Update ``trainer.ema`` after every optimizer step (and only then: the epoch-end log/save hook runs without
    a step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        t.ema.update(t.accelerator.unwrap_model(t.model))
