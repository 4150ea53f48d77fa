"""A tiny random Qwen2.5-VL built from configs (no download), for tests, tiny recipes and benchmarks.

Two text layers of width 32, a two-block vision tower, and a byte-level BPE (Qwen's kind) trained in memory on a
corpus the caller gives, so the words it cares about ("Yes", " Yes", plan tags...) become single tokens. Saved
like a hub checkpoint (``save_pretrained`` of model and processor), so every loader in the project reads it
through its real path (:class:`refiner_rl.vlm.LocalVLM`, the server, a trainer). Images are budgeted to
:data:`PIXELS` (2 x 2 merged vision tokens each).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

PIXELS = 56 * 56  # 2 x 2 merged vision tokens per image: the smallest Qwen2-VL input
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tiny_vlm(
    folder: str | os.PathLike,
    corpus: Iterable[str],
    *,
    vocab_size: int = 300,
    added_tokens: Sequence[str] = (),
    max_positions: int = 1024,
    seed: int = 0,
    prepare: Callable | None = None,
    patch_size: int = 14,
    pixels: int = PIXELS,
    hidden_size: int = 32,
    vision_depth: int = 2,
) -> str:
    """Write a tiny random Qwen2.5-VL (model, processor, chat template) to ``folder``; returns ``folder``.

    ``corpus`` trains the BPE (``vocab_size`` tokens); ``added_tokens`` are added as ordinary (not special) single
    tokens. The model's weights are drawn after ``torch.manual_seed(seed)``; ``prepare(model, tokenizer)``, if
    given, may change them before saving (e.g. to give chosen answer tokens most of the mass). ``patch_size`` is the
    vision tower's (the image processor's factor is ``2 * patch_size``), ``pixels`` the image budget (min = max),
    ``hidden_size`` the width of both towers, ``vision_depth`` the vision tower's blocks.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    if added_tokens:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL[1:]
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, merge_size=2
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden_size // 8,  # head_dim 8, as the mrope sections below split it
            "num_key_value_heads": hidden_size // 16,
            "max_position_embeddings": max_positions,
            # mrope splits head_dim / 2 = 4 rotary frequencies over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "window_size": 4 * patch_size,  # 2 x 2 merged tokens per attention window
            "fullatt_block_indexes": list(range(1, vision_depth, 2)),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if prepare is not None:
        prepare(model, tokenizer)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return os.fspath(folder)


def build_tiny_judge(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 300,
    init_std: float = 0.3,
    vision_init_std: float | None = None,
    **vision,
) -> str:
    """A tiny random judge: :func:`build_tiny_vlm` on a corpus of the judge's questions, so "Yes", " Yes", "No"
    and " No" are single tokens and the task and dimension words are few tokens each.

    Its weight matrices (all but the embeddings) are drawn with std ``init_std`` in the text model and half of it
    in the vision tower (or ``vision_init_std``), not the usual 0.02: at 0.02 attention is uniform, so P(Yes | A, B) barely depends on
    which image comes first and pairwise training sits at its saddle (loss ln 2) for hundreds of steps.
    """
    import torch

    from refiner_rl.vlm.questions import DEFAULT_TEMPLATES, DIMENSIONS, TASKS

    vision_std = init_std / 2 if vision_init_std is None else vision_init_std

    def spread(model, tokenizer) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.normal_(0.0, init_std if "language_model" in name else vision_std)

    corpus = ["Yes No Yes. No."] * 200 + [
        " ".join(TASKS.values()) + " " + " ".join(DIMENSIONS.values()) + " " + DEFAULT_TEMPLATES["pairwise"]
    ] * 5
    return build_tiny_vlm(
        folder, corpus, vocab_size=vocab_size, max_positions=1024, seed=seed, prepare=spread, **vision
    )
