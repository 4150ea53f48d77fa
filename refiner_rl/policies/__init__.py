"""Editor adapters behind one interface (:mod:`refiner_rl.policies.base`): FLUX.1-Kontext, FLUX.1-Fill and
Qwen-Image-Edit Plus."""

from refiner_rl.policies.base import EditorPolicy, editor_class, editor_kinds, pipeline_name, policy_class
from refiner_rl.policies.codec import Codec, PixelUnshuffleCodec, QwenVAECodec, VAECodec
from refiner_rl.policies.editor import LatentEditor
from refiner_rl.policies.fill import FillPolicy
from refiner_rl.policies.flux import (
    DEFAULT_LORA_TARGETS,
    Conditions,
    FluxPolicy,
    TextEmbeds,
    image_ids,
    pack_latents,
    unpack_latents,
)
from refiner_rl.policies.kontext import KontextPolicy
from refiner_rl.policies.qwen_edit import QwenEditPolicy

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "Codec",
    "Conditions",
    "EditorPolicy",
    "FillPolicy",
    "FluxPolicy",
    "KontextPolicy",
    "LatentEditor",
    "PixelUnshuffleCodec",
    "QwenEditPolicy",
    "QwenVAECodec",
    "TextEmbeds",
    "VAECodec",
    "editor_class",
    "editor_kinds",
    "image_ids",
    "pack_latents",
    "pipeline_name",
    "policy_class",
    "unpack_latents",
]
