"""The editor interface: what trainers, sampling, evaluation and the editing agent may ask of an editor.

Nothing outside :mod:`refiner_rl.policies` names a concrete editor. Code takes an :class:`EditorPolicy` and picks
one with :func:`policy_class`, which reads ``model_index.json``'s ``_class_name`` (the diffusers pipeline a model
folder or hub repo is) or one of the embedded tiny names.

An editor is a flow-matching velocity model over packed latent tokens:

- **conditions**: :meth:`EditorPolicy.encode_batch` turns a collated batch's :attr:`condition_fields` columns and
  the text embeddings into an opaque conditions object with ``select(rows)``, ``grid``, ``num_target_tokens`` and
  ``batch_size``; :meth:`encode_prompts` encodes instructions;
- **velocity**: :meth:`velocity` is the one forward (``v = eps - x0``) of SFT, rollout and training;
- **decode**: :meth:`decode` / :meth:`decode_with_grad` turn final tokens into ``[0, 1]`` images;
- **schedule**: :meth:`sigmas` is the sampling schedule of the model's own scheduler config;
- **sizes**: :attr:`size_multiple` (image sides), :attr:`latent_channels` (of a target token),
  :meth:`mask_to_tokens`, :meth:`encode_images` (the draft's latents, for starts below sigma 1);
- **LoRA**: :meth:`add_lora`, :meth:`save_lora` / :meth:`load_lora` in the format :attr:`pipeline_class`'s
  ``load_lora_weights`` reads, :meth:`adapter_disabled` (the frozen reference policy).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Protocol, runtime_checkable

import torch

from refiner_rl.errors import ConfigError

# diffusers pipeline class name -> "module:class" of its editor
EDITORS = {
    "FluxKontextPipeline": "refiner_rl.policies.kontext:KontextPolicy",
    "FluxFillPipeline": "refiner_rl.policies.fill:FillPolicy",
    "QwenImageEditPlusPipeline": "refiner_rl.policies.qwen_edit:QwenEditPolicy",
}
# the embedded tiny editors (random weights, built from configs) by name
TINY_EDITORS = {
    "tiny": "FluxKontextPipeline",
    "tiny-kontext": "FluxKontextPipeline",
    "tiny-fill": "FluxFillPipeline",
    "tiny-qwen-edit": "QwenImageEditPlusPipeline",
}
# read when a local folder has no model_index.json (folders written before editors were told apart)
DEFAULT_PIPELINE = "FluxKontextPipeline"


@runtime_checkable
class EditorPolicy(Protocol):
    """The interface above (module docstring). Implementations: :class:`~refiner_rl.policies.kontext.KontextPolicy`,
    :class:`~refiner_rl.policies.fill.FillPolicy`, :class:`~refiner_rl.policies.qwen_edit.QwenEditPolicy`."""

    kind: str
    pipeline_class_name: str
    condition_fields: tuple[str, ...]
    transformer: torch.nn.Module
    dtype: torch.dtype
    guidance_scale: float

    @property
    def device(self) -> torch.device: ...

    def to(self, device) -> EditorPolicy: ...

    def encode_prompts(self, prompts: list[str]): ...

    def encode_batch(self, batch: dict, text, negative_prompts: list[str] | None = None): ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def velocity(self, x, sigma, cond, *, transformer=None, true_cfg_scale: float = 1.0) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...

    def decode_with_grad(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...

    def sigmas(self, num_steps: int, num_tokens: int, start_sigma: float = 1.0) -> torch.Tensor: ...

    @property
    def size_multiple(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    def mask_to_tokens(self, mask: torch.Tensor) -> torch.Tensor: ...

    def add_lora(self, rank=16, **kwargs) -> None: ...

    @property
    def has_lora(self) -> bool: ...

    def adapter_disabled(self, transformer=None): ...

    def lora_state_dict(self, state_dict: dict | None = None) -> dict: ...

    def save_lora(self, path: str, state_dict: dict | None = None) -> None: ...

    def load_lora(self, path: str) -> None: ...

    @property
    def pipeline_class(self): ...

    def options(self) -> dict: ...


def editor_class(pipeline_class_name: str) -> type:
    """The editor class for a diffusers pipeline class name; a :class:`ConfigError` naming the known ones."""
    if pipeline_class_name not in EDITORS:
        raise ConfigError(
            f"no refiner-rl editor for diffusers pipeline {pipeline_class_name!r}; supported: {', '.join(EDITORS)}"
        )
    module, name = EDITORS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(module), name)


def editor_kinds() -> dict[str, type]:
    """``{kind: editor class}`` of every supported editor (``kontext``, ``fill``, ``qwen_edit``)."""
    return {cls.kind: cls for cls in map(editor_class, EDITORS)}


def pipeline_name(name_or_path: str, revision: str | None = None) -> str:
    """The diffusers pipeline class a model is: from a tiny name, a local folder's ``model_index.json`` (a folder
    without one is read as FLUX.1-Kontext) or a hub repo's (fetched by diffusers)."""
    if name_or_path in TINY_EDITORS:
        return TINY_EDITORS[name_or_path]
    if os.path.isdir(name_or_path):
        index = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(index):
            return DEFAULT_PIPELINE
        try:
            with open(index) as f:
                return json.load(f)["_class_name"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{index}: cannot read the pipeline's _class_name ({e})") from None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(name_or_path, revision=revision)["_class_name"]
    except (OSError, KeyError) as e:
        raise ConfigError(f"cannot read model_index.json of {name_or_path!r}: {e}") from None


def policy_class(name_or_path: str, revision: str | None = None) -> type:
    """The editor class that loads ``name_or_path`` (a tiny name, a local folder or a hub repo id)."""
    return editor_class(pipeline_name(name_or_path, revision))
