"""Process groups, DeepSpeed and ZeRO-3 helpers, so users and tests never repeat the CPU recipe.

What ``accelerate launch`` leaves to the program on a machine without CUDA (measured with accelerate 1.15,
deepspeed 0.19.8, transformers 5.23):

- the process group must be created with ``backend="gloo"`` before ``TrainingArguments`` sets up its devices,
  and the Trainer told to reuse it (``accelerator_config.use_configured_state``). Otherwise accelerate finds no
  backend and every process of a multi-process launch silently trains alone;
- DDP on CPU needs the state built with ``cpu=True`` (accelerate's MULTI_CPU, which wraps the model in DDP);
  DeepSpeed needs it built *without* ``cpu`` so that ``deepspeed.init_distributed`` runs;
- ``DS_ACCELERATOR=cpu`` keeps DeepSpeed off CUDA probing.

:func:`prepare_cpu_distributed` does all of it. Our config classes call it in ``__post_init__`` (before
``TrainingArguments`` touches the device), so ``refiner-rl sft|grpo`` and scripts that build the configs behave
the same under ``accelerate launch``. With CUDA it does nothing.

ZeRO-3 helpers: :func:`frozen_model_context` builds frozen networks whole (text encoders, reward models),
:func:`gathered_state_dict` gathers partitioned weights for saving, :func:`fill_deepspeed_auto_values` fills the
``"auto"`` bucket sizes that transformers derives from ``model.config.hidden_size`` (a diffusers config has none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")


def launched_distributed() -> bool:
    """More than one process was launched (torchrun / accelerate launch / deepspeed set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deepspeed_requested() -> bool:
    """``accelerate launch`` with a DeepSpeed config sets ``ACCELERATE_USE_DEEPSPEED``."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in TRUE


def prepare_cpu_distributed(args=None) -> bool:
    """Make a CPU launch (several processes, or DeepSpeed) train as one job; a no-op with CUDA or one plain process.

    Creates accelerate's ``PartialState`` over gloo (once; later calls reuse it) and, when ``args`` (a
    ``TrainingArguments`` whose ``__post_init__`` has not yet run the device setup) is given, sets
    ``accelerator_config["use_configured_state"] = True`` so the Trainer reuses that state. Returns True when
    the CPU recipe applies.
    """
    # DeepSpeed from `accelerate launch` (environment) or from TrainingArguments' `--deepspeed ds.json`.
    use_ds = deepspeed_requested() or bool(getattr(args, "deepspeed", None))
    launched = launched_distributed() or (use_ds and "LOCAL_RANK" in os.environ)
    if torch.cuda.is_available() or not launched:
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import PartialState

    if not PartialState._shared_state:
        if use_ds:
            # not cpu=True: accelerate then runs deepspeed.init_distributed(gloo) and marks the state DEEPSPEED
            # (it reads ACCELERATE_USE_DEEPSPEED, which transformers also sets only for this call)
            before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend="gloo")
            finally:
                if before is None:
                    del os.environ["ACCELERATE_USE_DEEPSPEED"]
                else:
                    os.environ["ACCELERATE_USE_DEEPSPEED"] = before
        else:
            # cpu=True: accelerate's MULTI_CPU, which wraps the model in DDP
            PartialState(cpu=True, backend="gloo")
        state = PartialState()
        logger.info(
            "CPU launch: gloo process group, rank %d of %d (%s)",
            state.process_index,
            state.num_processes,
            state.distributed_type,
        )
    if args is not None:
        _use_configured_state(args)
    return True


def _use_configured_state(args) -> None:
    acc = getattr(args, "accelerator_config", None)
    if acc is None:
        args.accelerator_config = {"use_configured_state": True}
    elif isinstance(acc, dict):
        args.accelerator_config = {**acc, "use_configured_state": True}
    elif isinstance(acc, str):
        if acc.lstrip().startswith("{"):
            args.accelerator_config = {**json.loads(acc), "use_configured_state": True}
        else:  # a JSON file path, as TrainingArguments accepts
            with open(acc) as f:
                args.accelerator_config = {**json.load(f), "use_configured_state": True}
    else:  # an AcceleratorConfig
        acc.use_configured_state = True


# ------------------------------------------------------------------------------------------------ DeepSpeed
def is_zero3(trainer=None) -> bool:
    """ZeRO stage 3 is active (for this trainer's engine, or for the current transformers DeepSpeed config)."""
    if trainer is not None:
        if not getattr(trainer, "is_deepspeed_enabled", False):
            return False
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.hf_ds_config.is_zero3()
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def frozen_model_context():
    """Build frozen networks (VAE/codec, text encoders, reward models, a reference copy) whole under ZeRO-3.

    The same context the reward plug-ins use (:func:`refiner_rl.scoring.base.outside_zero3_init`): it turns off
    accelerate's and transformers' ``deepspeed.zero.Init`` while open, so nothing built there is partitioned.
    A no-op without ZeRO-3.
    """
    from refiner_rl.scoring.base import outside_zero3_init

    return outside_zero3_init()


def model_hidden_size(model: nn.Module) -> int:
    """The width DeepSpeed's ``"auto"`` bucket sizes are derived from.

    transformers reads ``model.config.hidden_size``; a diffusers transformer has none. FLUX's width is
    ``num_attention_heads * attention_head_dim`` (3072 for FLUX.1); other models fall back to ``hidden_size``,
    ``inner_dim``, or the widest ``nn.Linear`` input.
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    cfg = getattr(model, "config", None)
    if cfg is not None:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        if get("hidden_size"):
            return int(get("hidden_size"))
        if get("num_attention_heads") and get("attention_head_dim"):
            return int(get("num_attention_heads")) * int(get("attention_head_dim"))
        if get("inner_dim"):
            return int(get("inner_dim"))
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    if not widths:
        raise ValueError(
            "cannot infer the model width for DeepSpeed 'auto' bucket sizes: give explicit values in the DeepSpeed config"
        )
    return max(widths)


def fill_deepspeed_auto_values(hf_ds_config, model: nn.Module) -> dict[str, int]:
    """Replace the ``"auto"`` values transformers would derive from ``model.config.hidden_size`` (which a diffusers
    config lacks, so transformers raises) with the same formulas applied to :func:`model_hidden_size`.

    Returns the values filled (empty when the config had none on ``auto``).
    """
    h = model_hidden_size(model)
    wanted = {
        "zero_optimization.reduce_bucket_size": h * h,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
        "zero_optimization.stage3_param_persistence_threshold": 10 * h,
    }
    filled = {}
    for key, value in wanted.items():
        if hf_ds_config.is_auto(key):
            hf_ds_config.fill_only(key, value)
            filled[key] = value
    if filled:
        logger.info("DeepSpeed 'auto' values from the model width %d: %s", h, filled)
    return filled


def gathered_state_dict(engine, module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """A full CPU state dict of a ZeRO-3 partitioned ``module``, on rank 0 (``None`` on other ranks).

    Collective: every rank must call it. ``trainable_only`` gathers only the parameters that train (a LoRA
    adapter: a few MB, whatever the base model's size) instead of the whole model.
    """
    if not trainable_only:
        return engine._zero3_consolidated_16bit_state_dict()
    import deepspeed
    import torch.distributed as dist

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = {} if dist.get_rank() == 0 else None
    # One module's worth at a time keeps the peak small even for a rank-256 adapter on a 12B model.
    for n, p in named:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if out is not None:
                out[n] = p.detach().cpu().clone()
    return out


# ------------------------------------------------------------------------------------------------ sampling
def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (e.g. seed, step, record index, occurrence).

    Keying the noise of each sample by what the sample *is*, not by the process that happens to hold it, makes
    a run independent of how its global batch is split across ranks: 2 processes x 4 samples draw exactly the
    noise of 1 process x 8, and a resumed run draws the noise of the uninterrupted one.
    """
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def occurrence_keys(index: torch.Tensor) -> list[tuple[int, int]]:
    """``(record index, n-th time it appears in this batch)`` per sample: distinct keys for repeated records."""
    seen: dict[int, int] = {}
    out = []
    for i in index.tolist():
        out.append((int(i), seen.get(int(i), 0)))
        seen[int(i)] = seen.get(int(i), 0) + 1
    return out
