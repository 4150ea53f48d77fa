"""Process-group and DeepSpeed helpers, so users and tests don't repeat the CPU recipe (SPEC §6).

On a CPU, accelerate must create the process group with ``backend="gloo"``: otherwise each process of a
multi-process launch silently runs alone. transformers' Trainer then reuses that state when it is told to
(``accelerator_config={"use_configured_state": True}``).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group_for_cpu(config=None) -> None:
    """Create accelerate's state with gloo when several processes run without CUDA."""
    if not launched_distributed() or torch.cuda.is_available():
        return
    from accelerate import PartialState

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    PartialState(backend="gloo")
    if config is not None:
        acc = getattr(config, "accelerator_config", None)
        if acc is not None and hasattr(acc, "use_configured_state"):
            acc.use_configured_state = True
    logger.info("CPU multi-process run: gloo process group, rank %s of %s", os.environ.get("RANK"), os.environ.get("WORLD_SIZE"))


def frozen_model_context():
    """A context in which frozen networks (VAE, text encoders, reward models) are built whole, even when
    the trainer runs DeepSpeed ZeRO-3 (whose init context would otherwise partition them)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except Exception:  # pragma: no cover
        return contextlib.nullcontext()
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(enabled=False)
