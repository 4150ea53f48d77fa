"""FLUX.1-Kontext policy adapter: loading, condition encoding, the one velocity forward, decoding, LoRA.

Token layout (OmniRefiner §3): the image stream is ``[noisy target | draft | reference]`` on the sequence
axis. Each block keeps its own row/col grid (the reference's can be all zero or moved beside the draft's:
:func:`reference_ids`); the first RoPE id channel tells them apart: target 0, draft 1, reference ``reference_id``
(default 2). The velocity is read from the target tokens only.

:meth:`KontextPolicy.velocity` is the single forward used by SFT, GRPO rollout and GRPO training, so the
log-prob recomputed in training equals the one stored at rollout by construction.

Why this file is ~500 lines: everything one editor family needs (loading from the hub, a folder or the tiny
config; text, image and condition encoding; the velocity forward; LoRA save/load in the diffusers format) sits in
one adapter, so adding the next editor (Qwen-Image-Edit, FLUX.2) means adding one file beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from refiner_rl.errors import MissingFileError
from refiner_rl.policies.codec import Codec, VAECodec

logger = logging.getLogger(__name__)

# Attention and feed-forward projections of the MM-DiT blocks (OmniRefiner puts LoRA there); the names
# also match the single-stream blocks' attention.
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: Flux's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid ``h x w`` (both even)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(grid_h: int, grid_w: int, index: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids ``[grid_h * grid_w, 3]``: channel 0 = image index, 1 = row, 2 = col."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(grid_h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device, dtype=dtype)[None, :]
    return ids.reshape(grid_h * grid_w, 3)


REFERENCE_POSITIONS = ("grid", "none", "beside")


def reference_ids(grid_h: int, grid_w: int, index: int, positions: str = "grid", draft_w: int = 0, device=None):
    """RoPE ids of the reference tokens: ``grid`` their own row/col grid (over the draft's when the sizes match),
    ``none`` row = col = 0 (attention to the reference depends on content only, not on where a token sits), or
    ``beside`` the grid moved right by the draft's width ``draft_w`` (no reference token shares a draft position)."""
    ids = image_ids(grid_h, grid_w, index, device)
    if positions == "none":
        ids[:, 1:] = 0
    elif positions == "beside":
        ids[:, 2] += draft_w
    elif positions != "grid":
        raise ValueError(f"reference_positions must be one of {', '.join(REFERENCE_POSITIONS)}, got {positions!r}")
    return ids


@dataclass
class TextEmbeds:
    prompt_embeds: torch.Tensor  # [B, T, D] (T5)
    pooled: torch.Tensor  # [B, P] (CLIP pooled)


@dataclass
class Conditions:
    """Everything the velocity forward needs besides the noisy target: computed once per record and
    shared by every sample of its group (see :meth:`select`)."""

    tokens: torch.Tensor  # [B, M, C] packed draft + reference latents
    ids: torch.Tensor  # [M, 3]
    target_ids: torch.Tensor  # [N, 3]
    text: TextEmbeds
    grid: tuple[int, int]  # target latent grid (h, w) before packing
    negative: TextEmbeds | None = None  # for true classifier-free guidance

    @property
    def num_target_tokens(self) -> int:
        return self.target_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> Conditions:
        neg = (
            None
            if self.negative is None
            else TextEmbeds(self.negative.prompt_embeds[index], self.negative.pooled[index])
        )
        return replace(
            self,
            tokens=self.tokens[index],
            text=TextEmbeds(self.text.prompt_embeds[index], self.text.pooled[index]),
            negative=neg,
        )


class KontextPolicy:
    """A FLUX.1-Kontext editor seen as a policy over latent trajectories.

    Frozen parts (codec, text encoders) stay in ``eval()`` with no grad; only ``transformer`` trains
    (its LoRA adapter, or all of it).
    """

    def __init__(
        self,
        transformer: nn.Module,
        codec: Codec,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2=None,
        *,
        max_sequence_length: int = 512,
        reference_id: int = 2,
        guidance_scale: float = 2.5,
        dtype: torch.dtype = torch.float32,
    ):
        self.transformer = transformer
        self.codec = codec
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.reference_id = int(reference_id)
        self.reference_positions = "grid"  # see reference_ids
        if self.reference_id in (0, 1):
            raise ValueError("reference_id must differ from the target's id (0) and the draft's id (1)")
        self.guidance_scale = guidance_scale
        self.dtype = dtype
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in (codec, text_encoder, text_encoder_2):
            if m is not None:
                m.eval().requires_grad_(False)

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32, reference_id: int = 2, **spec_overrides) -> KontextPolicy:
        """A tiny editor with random weights (see :mod:`refiner_rl.policies.tiny`)."""
        from refiner_rl.policies.tiny import tiny_components

        c = tiny_components(**spec_overrides)
        return cls(
            c["transformer"],
            c["codec"],
            c["text_encoder"],
            c["tokenizer"],
            c["text_encoder_2"],
            c["tokenizer_2"],
            max_sequence_length=c["max_sequence_length"],
            reference_id=reference_id,
            dtype=dtype,
        )

    def load_transformer(self, path: str) -> None:
        """Replace the transformer's weights with a full fine-tune saved by ``save_pretrained`` (safetensors only).

        The architecture must match: a checkpoint of another shape fails with both configs named."""
        from diffusers import FluxTransformer2DModel

        if not os.path.isdir(path):
            raise MissingFileError(
                f"transformer folder {path!r} does not exist (expected a save_pretrained output with config.json)"
            )
        loaded = FluxTransformer2DModel.from_pretrained(path, torch_dtype=self.dtype, use_safetensors=True)

        def plain(cfg):  # JSON round trip: tuples become lists
            return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()}

        mine, theirs = plain(self.transformer.config), plain(loaded.config)
        diff = {
            k: (mine.get(k), theirs.get(k))
            for k in set(mine) | set(theirs)
            if not k.startswith("_") and mine.get(k) != theirs.get(k)
        }
        if diff:
            raise ValueError(f"{path!r} holds a transformer of another shape: (ours, theirs) = {diff}")
        self.transformer.load_state_dict(loaded.state_dict())

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        trust_remote_code: bool = False,
        transformer_path: str | None = None,
        max_sequence_length: int = 512,
        reference_id: int = 2,
        guidance_scale: float = 2.5,
        load_text_encoders: bool = True,
    ) -> KontextPolicy:
        """Load from a diffusers repo id or a local folder laid out like ``black-forest-labs/FLUX.1-Kontext-dev``
        (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``).

        Weights load from safetensors only. ``transformer_path`` points at a separately saved transformer
        (a full fine-tune written by ``save_pretrained``)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        if os.path.isdir(name_or_path):
            missing = [d for d in ("transformer", "vae") if not os.path.isdir(os.path.join(name_or_path, d))]
            if missing:
                raise MissingFileError(
                    f"model folder {name_or_path!r} lacks {missing}; expected the diffusers layout of "
                    "FLUX.1-Kontext-dev (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)"
                )
        common = dict(revision=revision, use_safetensors=True)
        if transformer_path:
            transformer = FluxTransformer2DModel.from_pretrained(
                transformer_path, torch_dtype=dtype, use_safetensors=True
            )
        else:
            transformer = FluxTransformer2DModel.from_pretrained(
                name_or_path, subfolder="transformer", torch_dtype=dtype, **common
            )
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", torch_dtype=dtype, **common)
        enc = tok = enc2 = tok2 = None
        if load_text_encoders:
            tkw = dict(revision=revision, trust_remote_code=trust_remote_code)
            tok = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **tkw)
            tok2 = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **tkw)
            enc = AutoModel.from_pretrained(
                name_or_path, subfolder="text_encoder", dtype=dtype, use_safetensors=True, **tkw
            )
            enc2 = _load_t5_encoder(name_or_path, dtype, tkw)
        return cls(
            transformer,
            VAECodec(vae),
            enc,
            tok,
            enc2,
            tok2,
            max_sequence_length=max_sequence_length,
            reference_id=reference_id,
            guidance_scale=guidance_scale,
            dtype=dtype,
        )

    def save_pretrained_components(self, path: str) -> None:
        """Write every component in the Kontext folder layout (so :meth:`from_pretrained` reloads it)."""
        if not isinstance(self.codec, VAECodec):
            raise ValueError("only policies with an AutoencoderKL codec can be written in the diffusers folder layout")
        self.transformer.save_pretrained(os.path.join(path, "transformer"))
        self.codec.vae.save_pretrained(os.path.join(path, "vae"))
        for sub, obj in (
            ("text_encoder", self.text_encoder),
            ("tokenizer", self.tokenizer),
            ("text_encoder_2", self.text_encoder_2),
            ("tokenizer_2", self.tokenizer_2),
        ):
            if obj is not None:
                obj.save_pretrained(os.path.join(path, sub))

    # ---------------------------------------------------------------------------------------------- devices
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device) -> KontextPolicy:
        self.transformer.to(device)
        for m in (self.codec, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device)
        self._text_cache.clear()
        return self

    # ------------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeds:
        """CLIP pooled + T5 sequence embeddings, cached per prompt string."""
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise ValueError(
                "this policy has no text encoders: pass precomputed `prompt_embeds` and `pooled_prompt_embeds` "
                "columns, or load the model with its text encoders"
            )
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            dev = self.text_encoder.device
            ids = self.tokenizer(
                todo,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(dev)
            pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
            ids2 = self.tokenizer_2(
                todo, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.text_encoder_2.device)
            seq = self.text_encoder_2(ids2, output_hidden_states=False)[0]
            for i, p in enumerate(todo):
                self._text_cache[p] = (seq[i].detach(), pooled[i].detach())
        seq = torch.stack([self._text_cache[p][0] for p in prompts])
        pooled = torch.stack([self._text_cache[p][1] for p in prompts])
        return TextEmbeds(seq.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    # ----------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> packed latents ``[B, N, C]`` (fp32)."""
        self._check_size(images)
        latents = self.codec.encode(images.to(self.device))
        return pack_latents(latents.float())

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` in [0, 1]."""
        return self.codec.decode(unpack_latents(tokens.float(), *grid)).float()

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.codec.downsample
        return height // f, width // f

    def _check_size(self, images: torch.Tensor) -> None:
        m = self.codec.downsample * 2
        h, w = images.shape[-2:]
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be a multiple of {m} (codec downsample x 2x2 packing)")

    @torch.no_grad()
    def encode_conditions(
        self,
        draft: torch.Tensor,
        reference: torch.Tensor,
        prompts: list[str] | None = None,
        text: TextEmbeds | None = None,
        negative_prompts: list[str] | None = None,
    ) -> Conditions:
        """Encode draft and reference (each on its own grid) and the instruction, once per record."""
        if text is None:
            if prompts is None:
                raise ValueError("encode_conditions needs `prompts` or precomputed `text` embeddings")
            text = self.encode_prompts(prompts)
        d = self.encode_images(draft)
        r = self.encode_images(reference)
        dh, dw = self.latent_grid(*draft.shape[-2:])
        rh, rw = self.latent_grid(*reference.shape[-2:])
        dev = self.device
        ref = reference_ids(rh // 2, rw // 2, self.reference_id, self.reference_positions, dw // 2, dev)
        ids = torch.cat([image_ids(dh // 2, dw // 2, 1, dev), ref])
        neg = self.encode_prompts(negative_prompts) if negative_prompts is not None else None
        return Conditions(
            tokens=torch.cat([d, r], dim=1),
            ids=ids,
            target_ids=image_ids(dh // 2, dw // 2, 0, dev),
            text=text,
            grid=(dh, dw),
            negative=neg,
        )

    def mask_to_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask ``[B, 1, H, W]`` -> fraction of each target token covered by the mask, ``[B, N]``."""
        f = self.codec.downsample * 2
        return F.avg_pool2d(mask.float().to(self.device), kernel_size=f).flatten(1)

    # --------------------------------------------------------------------------------------------- velocity
    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditions,
        *,
        transformer: nn.Module | None = None,
        true_cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` for the noisy target tokens ``x`` ``[B, N, C]`` at ``sigma`` ``[B]``.

        The one forward of the project. ``transformer`` lets a trainer pass its wrapped (DDP/DeepSpeed)
        module. With ``true_cfg_scale > 1`` and negative embeddings, conditional and unconditional passes
        run as one batch and combine as ``v_u + s (v_c - v_u)``. Returns fp32.
        """
        model = transformer if transformer is not None else self.transformer
        n = x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        hidden = torch.cat([x.to(self.dtype), cond.tokens.to(self.dtype)], dim=1)
        ids = torch.cat([cond.target_ids, cond.ids]).to(self.dtype)
        text = cond.text
        cfg = true_cfg_scale > 1.0 and cond.negative is not None
        if cfg:
            hidden = torch.cat([hidden, hidden])
            sigma = torch.cat([sigma, sigma])
            text = TextEmbeds(
                torch.cat([text.prompt_embeds, cond.negative.prompt_embeds]),
                torch.cat([text.pooled, cond.negative.pooled]),
            )
        guidance = None
        cfg_obj = getattr(_unwrap(model), "config", None)
        if cfg_obj is not None and getattr(cfg_obj, "guidance_embeds", False):
            guidance = torch.full((hidden.shape[0],), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(text.prompt_embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        out = model(
            hidden_states=hidden,
            encoder_hidden_states=text.prompt_embeds.to(self.dtype),
            pooled_projections=text.pooled.to(self.dtype),
            timestep=sigma.to(self.dtype),
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        v = out[:, :n].float()
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + true_cfg_scale * (v_c - v_u)
        return v

    # ------------------------------------------------------------------------------------------------- LoRA
    def add_lora(
        self,
        rank=16,
        alpha: float | None = None,
        target_modules=DEFAULT_LORA_TARGETS,
        dropout: float = 0.0,
        init: str | bool = True,
    ) -> None:
        """Attach a peft LoRA adapter to the transformer (base weights frozen). ``rank`` may be a whole peft
        ``LoraConfig`` (the other arguments are then unused); one without ``target_modules`` gets
        :data:`DEFAULT_LORA_TARGETS`."""
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("the transformer already has a LoRA adapter: attach one adapter only")
        if isinstance(rank, LoraConfig):
            cfg = rank
            if cfg.target_modules is None:
                cfg = replace(cfg, target_modules=set(DEFAULT_LORA_TARGETS))
        else:
            cfg = LoraConfig(
                r=rank,
                lora_alpha=alpha if alpha is not None else rank,
                lora_dropout=dropout,
                target_modules=list(target_modules),
                init_lora_weights=init,
            )
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(cfg)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(_unwrap(self.transformer), "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def adapter_disabled(self, transformer: nn.Module | None = None):
        """The reference policy for KL: the same transformer with the LoRA adapter switched off."""
        model = _unwrap(transformer if transformer is not None else self.transformer)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    def lora_state_dict(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(_unwrap(self.transformer), state_dict=state_dict)

    def save_lora(self, path: str, state_dict: dict | None = None) -> None:
        """Write the adapter in the format ``FluxKontextPipeline.load_lora_weights`` reads."""
        from diffusers import FluxKontextPipeline

        model = _unwrap(self.transformer)
        metadata = model.peft_config["default"].to_dict()
        metadata = {k: (list(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        FluxKontextPipeline.save_lora_weights(
            path,
            transformer_lora_layers=self.lora_state_dict(state_dict),
            safe_serialization=True,
            transformer_lora_adapter_metadata=metadata,
        )

    def load_lora(self, path: str) -> None:
        """Load an adapter written by :meth:`save_lora` into the existing adapter (for resume)."""
        from diffusers import FluxKontextPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        sd = FluxKontextPipeline.lora_state_dict(path)
        sd = sd[0] if isinstance(sd, tuple) else sd
        sd = {k[len("transformer.") :]: v for k, v in sd.items() if k.startswith("transformer.")}
        result = set_peft_model_state_dict(
            _unwrap(self.transformer), convert_unet_state_dict_to_peft(sd), adapter_name="default"
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA at {path!r} does not match this transformer: unexpected keys {unexpected[:5]}")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _load_t5_encoder(path, dtype, tkw):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, use_safetensors=True, **tkw)
