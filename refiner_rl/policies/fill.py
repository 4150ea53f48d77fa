"""FLUX.1-Fill: OneReward's editor for mask-guided fill, extend (outpainting) and object removal.

FLUX.1-Fill takes no reference image. Its conditions ride on the channel axis, as in diffusers'
``FluxFillPipeline``: each noisy target token is concatenated with

1. the packed latents of the masked image (the image with the masked pixels set to mid-grey, 0 in the codec's
   ``[-1, 1]`` input range), then
2. the packed pixel mask: the binarised mask at full resolution, each ``f x f`` pixel block (``f`` the codec's
   downsampling) folded into ``f^2`` channels of its latent pixel, then 2x2-packed like the latents.

So the transformer reads ``2 C + 4 f^2`` channels per token (``C`` the packed latent channels; 384 for
FLUX.1-Fill-dev: 64 + 64 + 256) and returns ``C``. White mask pixels are repainted, black ones kept.
"""

from __future__ import annotations

import torch

from refiner_rl.policies.flux import Conditions, FluxPolicy, TextEmbeds, image_ids, pack_latents

__all__ = ["FillPolicy", "fold_mask"]


def fold_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Binarised pixel mask ``[B, 1, H, W]`` -> ``[B, f^2, H / f, W / f]``: each ``f x f`` block of pixels becomes
    the channels of its latent pixel (row-major within the block), as FluxFillPipeline folds it before packing."""
    b, _, h, w = mask.shape
    m = mask[:, 0].reshape(b, h // factor, factor, w // factor, factor).permute(0, 2, 4, 1, 3)
    return m.reshape(b, factor * factor, h // factor, w // factor)


class FillPolicy(FluxPolicy):
    """A FLUX.1-Fill editor: repaints the masked part of ``draft`` (the image to edit) following the instruction."""

    kind = "fill"
    pipeline_class_name = "FluxFillPipeline"
    condition_fields = ("draft", "mask")
    default_guidance_scale = 30.0

    @property
    def mask_channels(self) -> int:
        """Channels the packed mask adds to each token: ``4 f^2``."""
        return 4 * self.codec.downsample**2

    @torch.no_grad()
    def encode_conditions(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompts: list[str] | None = None,
        text: TextEmbeds | None = None,
        negative_prompts: list[str] | None = None,
    ) -> Conditions:
        """Encode the image with its masked part greyed out, the mask, and the instruction, once per record.
        ``mask`` ``[B, 1, H, W]`` is binarised at 0.5 (1 = repaint)."""
        if text is None:
            if prompts is None:
                raise ValueError("encode_conditions needs `prompts` or precomputed `text` embeddings")
            text = self.encode_prompts(prompts)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from the image's {tuple(image.shape[-2:])}")
        dev = self.device
        m = (mask.to(dev).float() >= 0.5).float()
        masked = image.to(dev).float() * (1.0 - m) + 0.5 * m
        latents = self.encode_images(masked)
        folded = pack_latents(fold_mask(m, self.codec.downsample))
        h, w = self.latent_grid(*image.shape[-2:])
        neg = self.encode_prompts(negative_prompts) if negative_prompts is not None else None
        return Conditions(
            target_ids=image_ids(h // 2, w // 2, 0, dev),
            text=text,
            grid=(h, w),
            channels=torch.cat([latents, folded], dim=2),
            negative=neg,
        )
