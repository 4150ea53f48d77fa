"""A frozen local VLM: loaded once per settings, next-token logits for a batch of chats, greedy answers.

Loading is ``transformers``' ``AutoProcessor`` and ``AutoModelForImageTextToText.from_pretrained`` (safetensors,
outside DeepSpeed ZeRO-3 partitioning), then frozen. The processor pads on the left, so the first answer token's
logits of every chat in a batch are at position -1.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from refiner_rl.errors import CheckpointError
from refiner_rl.scoring.base import freeze, outside_zero3_init
from refiner_rl.vlm.questions import single_token_ids

_LOCAL_CACHE: dict[tuple, LocalVLM] = {}
_LOCAL_LOCK = threading.Lock()


class LocalVLM:
    """A frozen transformers VLM (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g. Qwen2/2.5-VL) that
    reads next-token logits (:meth:`next_token_logits`, the judge's forward) or answers chats greedily
    (:meth:`generate`). Chats are in transformers' format (:func:`refiner_rl.vlm.questions.build_conversation`).
    Also served over HTTP by :mod:`refiner_rl.vlm.server`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"cannot load a VLM processor from model_name_or_path={model_name_or_path!r} ({err}). Offline, point it "
                "at a local folder with the model's config, safetensors weights and processor/tokenizer files, fetched once "
                f"with `hf download {model_name_or_path} --local-dir DIR`, or serve the model (vLLM, SGLang) and use its "
                "OpenAI-compatible endpoint instead."
            ) from err
        if min_pixels is not None or max_pixels is not None:
            # Qwen2-VL image processors take the pixel budget as size={shortest_edge: min, longest_edge: max}
            # (min_pixels=/max_pixels= still work in transformers 5 but warn at every call).
            old = getattr(self.processor.image_processor, "size", None) or {}
            get = old.get if isinstance(old, dict) else lambda key: getattr(old, key, None)
            size = {
                "shortest_edge": min_pixels or get("shortest_edge"),
                "longest_edge": max_pixels or get("longest_edge"),
            }
            self.processor = AutoProcessor.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code, size=size
            )
        self.tokenizer = self.processor.tokenizer
        # Left padding puts every chat's answer position at index -1.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with outside_zero3_init():  # a frozen judge must stay whole under ZeRO-3
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        freeze(self.model).to(device)
        self.device = torch.device(device)
        self.lock = threading.Lock()  # one forward at a time when served from threads

    def to(self, device: str | torch.device) -> LocalVLM:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @classmethod
    def shared(cls, model_name_or_path: str, **kwargs) -> LocalVLM:
        """Load once per (path, settings): several judges (dimensions) share one model."""
        key = (str(model_name_or_path), *sorted((k, str(v)) for k, v in kwargs.items()))
        with _LOCAL_LOCK:
            if key not in _LOCAL_CACHE:
                _LOCAL_CACHE[key] = cls(model_name_or_path, **kwargs)
            return _LOCAL_CACHE[key]

    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the words the tokenizer encodes as exactly one token (deduplicated, in order)."""
        return single_token_ids(self.tokenizer, words)

    def encode(self, conversations: Sequence[list[dict]]):
        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
        ]
        images = [[p["image"] for m in c for p in m["content"] if p["type"] == "image"] for c in conversations]
        kwargs = {"images": images} if any(images) else {}
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)

    def encode_tensors(self, conversations: Sequence[list[dict]]):
        """:meth:`encode` for chats whose images are float tensors ``[3, H, W]`` in [0, 1]: ``pixel_values`` is a
        differentiable function of them (:mod:`refiner_rl.vlm.pixels`; Qwen2-VL-class image processors)."""
        from refiner_rl.vlm.pixels import expand_image_tokens, image_settings, pixel_values

        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
        ]
        images = [p["image"] for c in conversations for m in c for p in m["content"] if p["type"] == "image"]
        settings = image_settings(self.processor.image_processor)
        values, grids = pixel_values([image.to(self.device) for image in images], settings)
        texts = expand_image_tokens(texts, grids, self.processor.image_token, settings["merge_size"])
        inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        if getattr(self.processor, "return_mm_token_type_ids", False):
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(inputs["input_ids"]))
        inputs = inputs.to(self.device)
        inputs["pixel_values"], inputs["image_grid_thw"] = values.to(self.model.dtype), grids.to(self.device)
        return inputs

    def answer_logits(self, inputs) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) at the last position of encoded chats, with autograd (the weights stay
        frozen; gradients reach whatever ``inputs`` require them, e.g. :meth:`encode_tensors`' pixels)."""
        with self.lock:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def last_logits(self, inputs) -> torch.Tensor:
        """Logits ``[B, V]`` (float32, CPU) at the last position of encoded chats: the first answer token."""
        with self.lock:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()

    def next_token_logits(self, conversations: Sequence[list[dict]], batch_size: int = 8) -> torch.Tensor:
        """:meth:`last_logits` of ``conversations``, ``batch_size`` chats per forward."""
        out = [
            self.last_logits(self.encode(conversations[i : i + batch_size]))
            for i in range(0, len(conversations), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def generate_ids(self, inputs, max_new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding of encoded chats: per chat, the new token ids (up to ``max_new_tokens``, through the end
        of sequence) and the logits ``[T, V]`` (float32, CPU) of each of those steps."""
        with self.lock:
            out = self.model.generate(
                **inputs,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, steps, V]
        eos = self.tokenizer.eos_token_id
        ids, steps = [], []
        for b in range(new.shape[0]):  # a chat that ended early is padded after its end of sequence
            row = new[b].tolist()
            length = next((k + 1 for k, t in enumerate(row) if t == eos), len(row))
            ids.append(row[:length])
            steps.append(logits[b, :length])
        return ids, steps

    def generate(
        self, conversations: Sequence[list[dict]], max_new_tokens: int = 256, batch_size: int = 8
    ) -> list[str]:
        """Greedy answers to ``conversations`` (special tokens removed), ``batch_size`` chats per call."""
        texts: list[str] = []
        for i in range(0, len(conversations), batch_size):
            ids, _ = self.generate_ids(self.encode(conversations[i : i + batch_size]), max_new_tokens)
            texts += [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        return texts
