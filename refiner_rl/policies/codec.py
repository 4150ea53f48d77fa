"""Image codecs: the small interface the policy uses to go between pixels and latents.

The real path wraps the editor's own autoencoder (``AutoencoderKL`` for FLUX.1, ``AutoencoderKLQwenImage`` for
Qwen-Image-Edit). The embedded default uses a lossless
pixel-unshuffle codec: tiny VAEs trained for minutes on a CPU reach only 12-15 dB PSNR on fine synthetic
detail (docs/algorithms.md#the-tiny-default), which would bury every reward in reconstruction error.

Both codecs take images ``[B, 3, H, W]`` in ``[0, 1]`` and return latents ``[B, C, H / f, W / f]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Codec(nn.Module):
    """Interface: ``encode``/``decode`` between ``[0, 1]`` images and normalised latents."""

    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class VAECodec(Codec):
    """The editor's ``AutoencoderKL``: encodes with the posterior's mode (not a sample), then applies the
    model's shift and scaling factors, exactly as ``FluxKontextPipeline`` does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.shift = float(cfg.shift_factor or 0.0)
        self.scale = float(cfg.scaling_factor or 1.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.vae.dtype) * 2.0 - 1.0
        z = self.vae.encode(x).latent_dist.mode()
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scale + self.shift
        x = self.vae.decode(z, return_dict=False)[0]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class PixelUnshuffleCodec(Codec):
    """Lossless space-to-depth codec with a fixed affine map: ``z = (unshuffle(x, f) - 0.5) * scale``.

    Its exact inverse makes reconstruction PSNR infinite, so the embedded default measures the policy, not
    the codec. ``scale = 2`` puts latents in ``[-1, 1]``, about the range of a real VAE's scaled latents.
    """

    def __init__(self, factor: int = 2, scale: float = 2.0):
        super().__init__()
        self.downsample = int(factor)
        self.latent_channels = 3 * self.downsample**2
        self.scale = float(scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (F.pixel_unshuffle(images.float(), self.downsample) - 0.5) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(latents.float() / self.scale + 0.5, self.downsample)
        return x.clamp(0.0, 1.0)


class QwenVAECodec(Codec):
    """Qwen-Image's ``AutoencoderKLQwenImage`` (a video VAE, read here one frame at a time): encodes with the
    posterior's mode and normalises each latent channel by the model's ``latents_mean`` / ``latents_std``, exactly as
    ``QwenImageEditPlusPipeline`` does; decoding inverts both."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.downsample = 2 ** len(cfg.temperal_downsample)  # the pipeline's vae_scale_factor
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.vae.dtype) * 2.0 - 1.0).unsqueeze(2)  # one frame
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        return (z - self.mean.to(z.dtype)) / self.std.to(z.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) * self.std.to(self.vae.dtype) + self.mean.to(self.vae.dtype)
        x = self.vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
