"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.policies import KontextPolicy

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6))


def small_policy(lora: bool = False, rank: int = 4, **overrides) -> KontextPolicy:
    torch.manual_seed(0)
    p = KontextPolicy.tiny(**{**SMALL, **overrides})
    if lora:
        p.add_lora(rank=rank)
    return p


def perturb_lora(policy: KontextPolicy, scale: float = 0.05, seed: int = 1) -> None:
    """LoRA B starts at zero, so a fresh adapter equals its reference (KL 0, ratio 1): give it some weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def synthetic_dataset(n: int = 8, seed: int = 0, size: int = 32, **kw) -> TripletDataset:
    return TripletDataset(synthetic_records(n, seed=seed, size=size), None, multiple=4, **kw)


def tiny_pipeline(transformer=None, **spec_overrides):
    """A diffusers ``FluxKontextPipeline`` over the tiny components (text encoders, tokenizers, transformer) with
    a small ``AutoencoderKL`` standing in for the pixel codec: what a user loads our LoRA / transformer into."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from refiner_rl.policies.tiny import tiny_components

    c = tiny_components(**spec_overrides)
    vae = AutoencoderKL(
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=12,
        norm_num_groups=1,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
        transformer=transformer or c["transformer"],
    )
