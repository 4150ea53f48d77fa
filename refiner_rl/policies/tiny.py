"""Tiny FLUX.1 editors (Kontext- or Fill-shaped) built from configs with random weights: no file, no network.

Used by the embedded default (``refiner-rl demo``), the tests and the benches. Sizes follow how
diffusers' own tests size a Kontext model, scaled up a little so the policy can learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def byte_tokenizer(model_max_length: int):
    """A byte-level tokenizer built in memory (256 byte tokens + specials), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=model_max_length,
    )


@dataclass
class TinySpec:
    """Shape of the tiny editor. Defaults: 2 + 2 blocks, 4 heads of 32 (measured to learn SFT
    on a CPU in minutes). ``codec='pixel'`` is the lossless codec; ``'vae'`` a random tiny AutoencoderKL."""

    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    codec: str = "pixel"
    codec_factor: int = 2
    vae_latent_channels: int = 4
    text_hidden: int = 32
    text_max_length: int = 32
    guidance_embeds: bool = False
    seed: int = 0


def tiny_components(spec: TinySpec | None = None, kind: str = "kontext", **overrides) -> dict:
    """Build every component of a tiny editor with random weights, in eval mode. ``kind``: ``kontext`` (the
    transformer reads packed latents) or ``fill`` (it also reads the masked image's latents and the packed mask on
    its channels: :mod:`refiner_rl.policies.fill`)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from refiner_rl.policies.codec import PixelUnshuffleCodec, VAECodec

    spec = spec or TinySpec()
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise ValueError(f"unknown tiny model option {k!r}; known: {sorted(spec.__dataclass_fields__)}")
        setattr(spec, k, v)
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(
            f"tiny model: sum(axes_dims_rope)={sum(spec.axes_dims_rope)} must equal attention_head_dim={spec.attention_head_dim}"
        )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        if spec.codec == "pixel":
            codec = PixelUnshuffleCodec(factor=spec.codec_factor)
        elif spec.codec == "vae":
            vae = AutoencoderKL(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                block_out_channels=(8,) * spec.codec_factor,
                down_block_types=("DownEncoderBlock2D",) * spec.codec_factor,
                up_block_types=("UpDecoderBlock2D",) * spec.codec_factor,
                layers_per_block=1,
                latent_channels=spec.vae_latent_channels,
                norm_num_groups=1,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.0609,
                scaling_factor=1.5035,
            )
            codec = VAECodec(vae)
        else:
            raise ValueError(f"tiny model: codec must be 'pixel' or 'vae', got {spec.codec!r}")
        out_channels = codec.latent_channels * 4  # 2x2 packing
        if kind == "kontext":
            in_channels = out_channels
        elif kind == "fill":  # noisy latents | masked image latents | packed mask
            in_channels = 2 * out_channels + 4 * codec.downsample**2
        else:
            raise ValueError(f"tiny model: kind must be 'kontext' or 'fill', got {kind!r}")
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            out_channels=None if kind == "kontext" else out_channels,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.joint_attention_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=tuple(spec.axes_dims_rope),
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=260,
                hidden_size=spec.pooled_projection_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=spec.text_max_length,
                bos_token_id=3,
                eos_token_id=1,
                pad_token_id=0,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=260,
                d_model=spec.joint_attention_dim,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    for module in (codec, clip, t5):
        module.eval().requires_grad_(False)
    return {
        "transformer": transformer,
        "codec": codec,
        "text_encoder": clip,
        "tokenizer": byte_tokenizer(spec.text_max_length),
        "text_encoder_2": t5,
        "tokenizer_2": byte_tokenizer(spec.text_max_length),
        "max_sequence_length": spec.text_max_length,
    }
