"""Editor adapters. One module per editor family; Kontext first."""

from refiner_rl.policies.codec import Codec, PixelUnshuffleCodec, VAECodec
from refiner_rl.policies.kontext import (
    DEFAULT_LORA_TARGETS,
    Conditions,
    KontextPolicy,
    TextEmbeds,
    image_ids,
    pack_latents,
    unpack_latents,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "Codec",
    "Conditions",
    "KontextPolicy",
    "PixelUnshuffleCodec",
    "TextEmbeds",
    "VAECodec",
    "image_ids",
    "pack_latents",
    "unpack_latents",
]
