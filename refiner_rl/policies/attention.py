"""Which attention kernel an editor's transformer runs, chosen through diffusers' attention dispatcher.

``attention_backend: auto`` (the default) picks torch's memory-efficient scaled-dot-product kernel on CUDA and leaves
torch's own choice elsewhere. On Hopper GPUs torch (from 2.11) tries cuDNN's attention first, and cuDNN attention has
open bf16 defects (NaN query gradients with a mask when the sequence length is 64 mod 128; an fp32 additive mask read
as 16-bit; illegal memory accesses at lengths that are not multiples of 128); the memory-efficient kernel is clean in
those reports at about the same speed. Any diffusers backend name can be set instead (``native``, ``_native_math``,
``_native_flash``, ``_native_cudnn``, ``flash``, ...).
"""

from __future__ import annotations

import logging

import torch

from refiner_rl.errors import ConfigError

logger = logging.getLogger(__name__)

CUDA_DEFAULT = "_native_efficient"


def backend_names() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The diffusers backend ``name`` stands for on ``device`` (``auto``: see the module docstring); a
    :class:`ConfigError` listing the known names for any other unknown one."""
    if name == "auto":
        return CUDA_DEFAULT if torch.device(device).type == "cuda" else "native"
    names = backend_names()
    if name not in names:
        raise ConfigError(f"attention_backend {name!r}: use auto or one of {', '.join(names)}")
    return name


def set_attention_backend(transformer, name: str, device: torch.device | str) -> str:
    """Route every attention layer of ``transformer`` (a diffusers model) through the backend ``name`` resolves to
    on ``device``; logs it and returns its name."""
    backend = resolve_attention_backend(name, device)
    if name != "auto" or backend != "native":  # auto off CUDA: leave torch's default as it is
        transformer.set_attention_backend(backend)
    logger.info("attention backend: %s (attention_backend: %s, %s)", backend, name, torch.device(device).type)
    return backend


def attention_backend(transformer) -> str:
    """The attention kernel a diffusers transformer runs: the dispatcher backend set on its attention processors, else
    torch's scaled-dot-product attention, which picks its own kernel."""
    model = getattr(transformer, "module", transformer)  # a DDP / DeepSpeed wrapper holds the model
    for m in model.modules() if hasattr(model, "modules") else ():
        backend = getattr(getattr(m, "processor", None), "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
    return "native (torch SDPA chooses the kernel)"
