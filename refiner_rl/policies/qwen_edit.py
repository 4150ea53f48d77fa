"""Qwen-Image-Edit Plus (2509, 2511): an editor that takes several condition images natively.

It runs on the components of diffusers' ``QwenImageEditPlusPipeline`` and follows that pipeline step by step:

- **condition tokens**: each condition image (for a refiner record: the draft, then the reference) is resized to about
  :attr:`~QwenEditPolicy.vae_condition_area` pixels (aspect kept, sides multiples of 32), encoded by the VAE in mode
  and 2x2-packed; the blocks follow the noisy target tokens on the sequence axis. The transformer tells them apart by
  their frame in ``img_shapes`` (target ``(1, h, w)`` first, then one per condition image), which sets the frame
  channel of its 3-axis RoPE; the velocity is read from the target tokens only.
- **instruction**: the Qwen2.5-VL model reads the instruction together with every condition image, resized to about
  :attr:`~QwenEditPolicy.vl_condition_area` pixels, in the pipeline's chat template ("Picture 1: <image> Picture 2:
  <image> instruction"); the last hidden states after the template's system part are the text stream. Embeddings
  depend on the images, so :meth:`~QwenEditPolicy.encode_prompts` only holds the instructions and
  :meth:`~QwenEditPolicy.encode_conditions` encodes them, cached per (instruction, images).
- **2511's zero_cond_t**: read by the transformer from its own config (condition tokens then get timestep 0's
  modulation); nothing here changes with it but ``img_shapes``, which tells the transformer where the target ends.
- **true CFG**: the negative prompt is encoded with the same images; the guided velocity
  ``v_u + s (v_c - v_u)`` is rescaled per token to the conditional velocity's norm, as the pipeline does.
- **schedule**: the model's own ``FlowMatchEulerDiscreteScheduler`` config (dynamic shift from the target token
  count, ``shift_terminal``), computed by that scheduler.

Options, LoRA and the codec round trip are shared with every editor (:mod:`refiner_rl.policies.editor`).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from refiner_rl.policies.codec import Codec, QwenVAECodec
from refiner_rl.policies.editor import LatentEditor, load_transformer_and_vae, scheduler_config, unwrap

__all__ = ["QWEN_LORA_TARGETS", "QWEN_SCHEDULER", "Instructions", "PromptEmbeds", "QwenConditions", "QwenEditPolicy"]

# Attention projections of both streams and the image / text MLPs of every dual-stream block.
QWEN_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
# FLUX.1's feed-forward names -> the same role here (image stream, text stream), so one target list serves both
FLUX_FEED_FORWARD = {
    "ff.net.0.proj": "img_mlp.net.0.proj",
    "ff.net.2": "img_mlp.net.2",
    "ff_context.net.0.proj": "txt_mlp.net.0.proj",
    "ff_context.net.2": "txt_mlp.net.2",
}

# The scheduler config of the Qwen-Image family's repos, used when a model folder has none (the tiny editor).
QWEN_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# The chat template the model was trained with (the pipeline's ``prompt_template_encode``), the tokens it drops from
# the front (its system part) and the marker of each condition image.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 64
IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
# Pixel areas the pipeline resizes each condition image to: for the VL encoder, and for the VAE.
VL_CONDITION_AREA = 384 * 384
VAE_CONDITION_AREA = 1024 * 1024


def condition_size(area: int, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of about ``area`` pixels with the aspect of ``height x width``, sides rounded to multiples
    of 32 (the pipeline's ``calculate_dimensions``)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(h / 32) * 32, round(w / 32) * 32


@dataclass
class Instructions:
    """Instructions not yet encoded: Qwen-Image-Edit encodes them together with the condition images."""

    prompts: list[str]

    def select(self, index) -> Instructions:
        rows = torch.arange(len(self.prompts))[index].reshape(-1).tolist()
        return Instructions([self.prompts[i] for i in rows])


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, T, D] last hidden states of the VL model after the template's system part
    mask: torch.Tensor  # [B, T] 1 = token, 0 = padding (rows of another length)

    def select(self, index: torch.Tensor | slice) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[index], self.mask[index])


@dataclass
class QwenConditions:
    """What the velocity forward needs besides the noisy target, once per record and shared by its samples."""

    text: PromptEmbeds
    tokens: torch.Tensor  # [B, M, C] packed latents of every condition image, in order
    img_shapes: tuple[tuple[int, int, int], ...]  # (frames, rows, cols) of the target's tokens, then each condition's
    grid: tuple[int, int]  # target latent grid (h, w) before packing
    negative: PromptEmbeds | None = None  # for true classifier-free guidance

    @property
    def num_target_tokens(self) -> int:
        return math.prod(self.img_shapes[0])

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor | slice) -> QwenConditions:
        return replace(
            self,
            text=self.text.select(index),
            tokens=self.tokens[index],
            negative=None if self.negative is None else self.negative.select(index),
        )


def _pad(rows: list[torch.Tensor]) -> PromptEmbeds:
    """Stack ``[T_i, D]`` rows right-padded with zeros, with their mask."""
    n = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(n, device=r.device) < r.shape[0] for r in rows]).long()
    return PromptEmbeds(embeds, mask)


class QwenEditPolicy(LatentEditor):
    """A Qwen-Image-Edit Plus editor: refines the ``draft`` with its ``reference`` and an instruction. It takes any
    number of condition images (:meth:`encode_conditions`); a refiner record gives the draft first, then each of its
    references in order (``reference``, ``reference_2``, ...)."""

    kind = "qwen_edit"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    transformer_class_name = "QwenImageTransformer2DModel"
    condition_fields = ("draft", "reference")
    max_references = None  # every reference is one more condition image
    default_guidance_scale = 1.0  # no guidance embedding: guidance is true CFG (``true_cfg_scale``)
    default_lora_targets = QWEN_LORA_TARGETS

    def __init__(
        self,
        transformer: nn.Module,
        codec: Codec,
        text_encoder: nn.Module | None = None,
        processor=None,
        *,
        guidance_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        scheduler_config: dict | None = None,
        vl_condition_area: int = VL_CONDITION_AREA,
        vae_condition_area: int | None = VAE_CONDITION_AREA,
        text_cache_size: int = 1024,
    ):
        self.transformer = transformer
        self.codec = codec
        self.text_encoder, self.processor = text_encoder, processor
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        self.dtype = dtype
        self.scheduler_config = dict(QWEN_SCHEDULER if scheduler_config is None else scheduler_config)
        self.vl_condition_area = int(vl_condition_area)
        # None: each condition image keeps its own size (a refiner at the draft's resolution)
        self.vae_condition_area = None if vae_condition_area is None else int(vae_condition_area)
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._freeze()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.codec, self.text_encoder]

    def _clear_caches(self) -> None:
        self._text_cache.clear()

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("vl_condition_area", "vae_condition_area")

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32, *, guidance_scale: float | None = None, **overrides):
        """A tiny editor with random weights (:func:`refiner_rl.policies.tiny.tiny_qwen_edit_components`).
        ``overrides``: this editor's options and :class:`~refiner_rl.policies.tiny.TinyQwenSpec` fields. Its
        condition areas default to small ones (64 x 64 for the VL model, 32 x 32 for the VAE)."""
        from refiner_rl.policies.tiny import tiny_qwen_edit_components

        options = {"vl_condition_area": 64 * 64, "vae_condition_area": 32 * 32}
        options.update({k: overrides.pop(k) for k in cls.option_names() if k in overrides})
        c = tiny_qwen_edit_components(**overrides)
        return cls(
            c["transformer"],
            c["codec"],
            c["text_encoder"],
            c["processor"],
            guidance_scale=guidance_scale,
            dtype=dtype,
            **options,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        trust_remote_code: bool = False,
        transformer_path: str | None = None,
        max_sequence_length: int | None = None,  # noqa: ARG003 - the pipeline's argument, unused there too
        guidance_scale: float | None = None,
        load_text_encoders: bool = True,
        **options,
    ):
        """Load from a diffusers repo id (``Qwen/Qwen-Image-Edit-2509``, ``Qwen/Qwen-Image-Edit-2511``) or a local
        folder in the pipeline's layout (``transformer/``, ``vae/``, ``text_encoder/``, ``processor/``, and
        ``scheduler/`` when present). Weights load from safetensors only; ``transformer_path`` points at a separately
        saved transformer (a full fine-tune)."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        transformer, vae = load_transformer_and_vae(
            name_or_path,
            QwenImageTransformer2DModel,
            AutoencoderKLQwenImage,
            dtype=dtype,
            revision=revision,
            transformer_path=transformer_path,
            layout=f"of {cls.pipeline_class_name} (transformer/, vae/, text_encoder/, tokenizer/, processor/)",
        )
        encoder = processor = None
        if load_text_encoders:
            tkw = dict(revision=revision, trust_remote_code=trust_remote_code)
            processor = AutoProcessor.from_pretrained(name_or_path, subfolder="processor", **tkw)
            encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                name_or_path, subfolder="text_encoder", dtype=dtype, use_safetensors=True, **tkw
            )
        return cls(
            transformer,
            QwenVAECodec(vae),
            encoder,
            processor,
            guidance_scale=guidance_scale,
            dtype=dtype,
            scheduler_config=scheduler_config(name_or_path, revision),
            **options,
        )

    def text_components(self) -> dict:
        return {"text_encoder": self.text_encoder, "tokenizer": self.processor.tokenizer, "processor": self.processor}

    def lora_targets(self, names):
        """FLUX.1's feed-forward names (the default ``lora_target_modules``) stand for the image / text MLPs here."""
        if isinstance(names, str):
            return names
        return {FLUX_FEED_FORWARD.get(n, n) for n in names}

    # ------------------------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> Instructions:
        """The instructions, held until :meth:`encode_conditions` encodes them with their condition images."""
        return Instructions(list(prompts))

    @torch.no_grad()
    def _encode_instruction(self, prompt: str, images: list) -> torch.Tensor:
        """``[T, D]`` text stream of one record: the VL model's last hidden states over the chat template holding
        one "Picture k" marker per condition image (``images``: PIL images at the VL resolution) and the
        instruction, without the template's first :data:`PROMPT_TEMPLATE_DROP` tokens. Cached per (instruction,
        images)."""
        key = (prompt, tuple((im.size, hashlib.sha1(im.tobytes()).hexdigest()) for im in images))
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if self.text_encoder is None or self.processor is None:
            raise ValueError(
                "this policy has no text encoder: load the model with its text encoder (Qwen2.5-VL) and processor"
            )
        markers = "".join(IMAGE_PROMPT.format(k + 1) for k in range(len(images)))
        text = PROMPT_TEMPLATE.format(markers + prompt)
        inputs = self.processor(text=[text], images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.text_encoder.device)
        out = self.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()][PROMPT_TEMPLATE_DROP:]
        self._text_cache[key] = hidden.detach()
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return self._text_cache[key]

    # ------------------------------------------------------------------------------------------- conditions
    def _image_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.size_multiple)

    def _vl_images(self, images: torch.Tensor, processor) -> list:
        """One row's condition images as PIL at the VL resolution (8-bit, resized as the pipeline does)."""
        pil = processor.numpy_to_pil(processor.pt_to_numpy(images.detach().float().clamp(0, 1).cpu()))
        out = []
        for im in pil:
            h, w = condition_size(self.vl_condition_area, im.height, im.width)
            out.append(processor.resize(im, h, w))
        return out

    def _vae_images(self, images: torch.Tensor, processor) -> torch.Tensor:
        """Condition images at the VAE resolution: as they are when that is their size (or with no
        :attr:`vae_condition_area`), else resized as the pipeline does (8-bit, Lanczos)."""
        if self.vae_condition_area is None:
            return images
        h, w = condition_size(self.vae_condition_area, *images.shape[-2:])
        if (h, w) == tuple(images.shape[-2:]):
            return images
        pil = processor.numpy_to_pil(processor.pt_to_numpy(images.detach().float().clamp(0, 1).cpu()))
        arrays = [np.asarray(processor.resize(im, h, w), dtype=np.float32) / 255.0 for im in pil]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(images.device)

    @torch.no_grad()
    def encode_conditions(
        self,
        *images: torch.Tensor,
        prompts: list[str] | None = None,
        text: Instructions | list[str] | None = None,
        negative_prompts: list[str] | None = None,
    ) -> QwenConditions:
        """Conditions from one or more condition images ``[B, 3, H_k, W_k]`` in [0, 1] (the first one, the draft,
        sets the output's size) and the instructions (``prompts``, or ``text`` from :meth:`encode_prompts`)."""
        if not images:
            raise ValueError("encode_conditions needs at least one condition image (the draft)")
        if text is not None:
            if not isinstance(text, Instructions | list):
                raise ValueError(
                    f"{type(self).__name__} encodes the instruction together with the condition images: pass the "
                    "prompts (precomputed FLUX.1 prompt_embeds columns do not apply to this editor)"
                )
            prompts = text.prompts if isinstance(text, Instructions) else list(text)
        if prompts is None:
            raise ValueError("encode_conditions needs `prompts` or `text` from encode_prompts")
        b = images[0].shape[0]
        if len(prompts) != b or any(im.shape[0] != b for im in images):
            raise ValueError(
                f"encode_conditions: {len(prompts)} prompts for images of batch sizes {[len(i) for i in images]}"
            )
        self._check_size(images[0])
        processor = self._image_processor()
        vl = [self._vl_images(im, processor) for im in images]  # [image k][row]
        per_row = [[vl[k][i] for k in range(len(images))] for i in range(b)]
        dev = self.device
        tokens, shapes = [], []
        for im in images:
            vae_in = self._vae_images(im.to(dev), processor)
            tokens.append(self.encode_images(vae_in))
            h, w = self.latent_grid(*vae_in.shape[-2:])
            shapes.append((1, h // 2, w // 2))
        grid = self.latent_grid(*images[0].shape[-2:])
        text_embeds = _pad([self._encode_instruction(p, per_row[i]) for i, p in enumerate(prompts)])
        negative = None
        if negative_prompts is not None:
            negative = _pad([self._encode_instruction(p, per_row[i]) for i, p in enumerate(negative_prompts)])
        return QwenConditions(
            text=PromptEmbeds(text_embeds.embeds.to(dev), text_embeds.mask.to(dev)),
            tokens=torch.cat(tokens, dim=1),
            img_shapes=((1, grid[0] // 2, grid[1] // 2), *shapes),
            grid=grid,
            negative=None if negative is None else PromptEmbeds(negative.embeds.to(dev), negative.mask.to(dev)),
        )

    # ------------------------------------------------------------------------------------------- scheduler
    def sigmas(self, num_steps: int, num_tokens: int, start_sigma: float = 1.0) -> torch.Tensor:
        """The sampling schedule of this model's own scheduler config for ``num_tokens`` target tokens (dynamic
        shift, ``shift_terminal``), as that scheduler computes it for the pipeline, scaled to start at
        ``start_sigma``: ``num_steps + 1`` sigmas down to 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 sampling steps, got {num_steps}.")
        c = self.scheduler_config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(c)
        mu = None
        if c.get("use_dynamic_shifting", False):
            from refiner_rl.dynamics.schedules import calculate_shift

            mu = calculate_shift(
                num_tokens,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float() * float(start_sigma)

    # --------------------------------------------------------------------------------------------- velocity
    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: QwenConditions,
        *,
        transformer: nn.Module | None = None,
        true_cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` for the noisy target tokens ``x`` ``[B, N, C]`` at ``sigma`` ``[B]``.

        The one forward of SFT, rollout and training. The condition tokens follow ``x``; the output is sliced back to
        the target's tokens. With ``true_cfg_scale > 1`` and negative embeddings, a second pass reads the negative
        prompt and ``v = v_u + s (v_c - v_u)`` is rescaled per token to ``|v_c|``. Returns fp32."""
        model = transformer if transformer is not None else self.transformer
        n, b = x.shape[1], x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        hidden = torch.cat([x.to(self.dtype), cond.tokens.to(self.dtype)], dim=1)
        img_shapes = [list(cond.img_shapes)] * b
        guidance = None
        if getattr(unwrap(model).config, "guidance_embeds", False):
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)

        def forward(text: PromptEmbeds) -> torch.Tensor:
            mask = None if bool(text.mask.all()) else text.mask
            out = model(
                hidden_states=hidden,
                timestep=sigma.to(self.dtype),
                guidance=guidance,
                encoder_hidden_states=text.embeds.to(self.dtype),
                encoder_hidden_states_mask=mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
            return out[:, :n].float()

        v = forward(cond.text)
        if true_cfg_scale > 1.0 and cond.negative is not None:
            v_u = forward(cond.negative)
            guided = v_u + true_cfg_scale * (v - v_u)
            v = guided * (v.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return v
