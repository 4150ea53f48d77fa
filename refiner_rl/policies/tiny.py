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


# Qwen2.5-VL's chat and vision markers, added to the tiny byte-level vocabulary as single tokens
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass
class TinyQwenSpec:
    """Shape of the tiny Qwen-Image-Edit Plus editor (sizes after diffusers' own tests of the pipeline).

    The transformer reads 2x2-packed latents of a random tiny ``AutoencoderKLQwenImage`` (``codec='vae'``, 4x
    downsampling) or of the lossless pixel codec (``codec='pixel'``, no diffusers pipeline then). The instruction
    encoder is a two-layer Qwen2.5-VL with a two-layer vision tower, and its tokenizer is byte-level with the chat
    and vision markers as single tokens and each word of the chat template merged into one (:func:`qwen_byte_tokenizer`),
    so the template's system part is the 64 tokens the pipeline drops, as in Qwen's own vocabulary."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    zero_cond_t: bool = False
    codec: str = "vae"
    codec_factor: int = 2
    vae_latent_channels: int = 4
    text_hidden: int = 16
    vision_patch: int = 14
    min_pixels: int = 28 * 28
    max_pixels: int = 56 * 56 * 4
    seed: int = 0


def qwen_byte_tokenizer():
    """Qwen2 tokenizer over a byte-level vocabulary built in memory, with the chat and vision markers as single tokens
    and BPE merges that make each word of the pipeline's chat template one token (:func:`_word_merges`). So the
    template's system part is about as many tokens as in Qwen's own vocabulary (the 64 the pipeline drops) and the
    text stream holds the pictures and the instruction, not hundreds of template bytes."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    merges = _word_merges(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


def _word_merges(vocab: dict) -> list[tuple[str, str]]:
    """Merges (added to ``vocab``) under which every pre-token of the Qwen-Image-Edit chat template is one token: for
    each word, the pair of segments it still splits into under the merges so far is added, until it is whole (a new
    merge ranks last, so words already whole stay whole)."""
    import re

    from tokenizers import Regex, pre_tokenizers

    from refiner_rl.policies.qwen_edit import IMAGE_PROMPT, PROMPT_TEMPLATE

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    text = PROMPT_TEMPLATE.replace("{}", " ") + IMAGE_PROMPT
    plain = re.split("|".join(map(re.escape, QWEN_SPECIAL_TOKENS)), text)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def bpe(word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    for chunk in plain:
        for piece, _ in split.pre_tokenize_str(chunk):
            while len(parts := bpe(piece)) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    return merges


# Qwen2's pre-tokenizer pattern (its tokenizer.json)
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_qwen_edit_components(spec: TinyQwenSpec | None = None, **overrides) -> dict:
    """Every component of a tiny Qwen-Image-Edit Plus editor with random weights, in eval mode: ``transformer``
    (``QwenImageTransformer2DModel``), ``codec``, ``text_encoder`` (``Qwen2_5_VLForConditionalGeneration``) and
    ``processor`` (``Qwen2VLProcessor``, holding the tokenizer)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from refiner_rl.policies.codec import PixelUnshuffleCodec, QwenVAECodec

    spec = spec or TinyQwenSpec()
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise ValueError(f"unknown tiny model option {k!r}; known: {sorted(spec.__dataclass_fields__)}")
        setattr(spec, k, v)
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(
            f"tiny model: sum(axes_dims_rope)={sum(spec.axes_dims_rope)} must equal attention_head_dim={spec.attention_head_dim}"
        )
    tokenizer = qwen_byte_tokenizer()
    marker = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))))
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=spec.vision_patch, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        if spec.codec == "vae":
            z = spec.vae_latent_channels
            vae = AutoencoderKLQwenImage(
                base_dim=z * 6,
                z_dim=z,
                dim_mult=[1, 2, 4][: spec.codec_factor + 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True][: spec.codec_factor],
                latents_mean=[0.0] * z,
                latents_std=[1.0] * z,
            )
            codec = QwenVAECodec(vae)
        elif spec.codec == "pixel":
            codec = PixelUnshuffleCodec(factor=spec.codec_factor)
        else:
            raise ValueError(f"tiny model: codec must be 'vae' or 'pixel', got {spec.codec!r}")
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=codec.latent_channels * 4,
            out_channels=codec.latent_channels,
            num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.text_hidden,
            axes_dims_rope=tuple(spec.axes_dims_rope),
            zero_cond_t=spec.zero_cond_t,
        )
        h = spec.text_hidden
        config = Qwen2_5_VLConfig(
            text_config={
                "hidden_size": h,
                "intermediate_size": h,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                "bos_token_id": None,
                "eos_token_id": marker["<|im_end|>"],
                "pad_token_id": 0,
            },
            vision_config={
                "depth": 2,
                "hidden_size": h,
                "intermediate_size": h,
                "num_heads": 2,
                "out_hidden_size": h,
                "patch_size": spec.vision_patch,
                "fullatt_block_indexes": [1],
            },
            image_token_id=marker["<|image_pad|>"],
            video_token_id=marker["<|video_pad|>"],
            vision_start_token_id=marker["<|vision_start|>"],
            vision_end_token_id=marker["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(gen_state)
    for module in (codec, text_encoder):
        module.eval().requires_grad_(False)
    return {"transformer": transformer, "codec": codec, "text_encoder": text_encoder, "processor": processor}
