"""What every FLUX.1 editor shares: loading, text encoding, latent packing, the one velocity forward, LoRA.

FLUX.1-Kontext (:mod:`refiner_rl.policies.kontext`) and FLUX.1-Fill (:mod:`refiner_rl.policies.fill`) run the same
``FluxTransformer2DModel`` and differ only in how their conditions reach it:

- **on the sequence axis** (Kontext): condition tokens (draft, reference) follow the noisy target tokens, each block
  with its own RoPE ids (:attr:`Conditions.tokens`, :attr:`Conditions.ids`);
- **on the channel axis** (Fill): the masked image's latents and the packed mask are concatenated to every noisy
  target token's channels (:attr:`Conditions.channels`).

:meth:`FluxPolicy.velocity` handles both, so it stays the single forward of SFT, rollout and training: the log-prob
recomputed in training equals the one stored at rollout by construction. A subclass writes
:meth:`~FluxPolicy.encode_conditions` and names its diffusers pipeline; the interface every trainer relies on is
:class:`refiner_rl.policies.base.EditorPolicy`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, replace
from typing import ClassVar

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

# The sampling scheduler of the FLUX.1 [dev] family (FlowMatchEulerDiscreteScheduler's config in their repos), used
# when a model folder has no scheduler/ of its own (the tiny editors).
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


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


@dataclass
class TextEmbeds:
    prompt_embeds: torch.Tensor  # [B, T, D] (T5)
    pooled: torch.Tensor  # [B, P] (CLIP pooled)

    def select(self, index: torch.Tensor | slice) -> TextEmbeds:
        return TextEmbeds(self.prompt_embeds[index], self.pooled[index])


@dataclass
class Conditions:
    """Everything the velocity forward needs besides the noisy target: computed once per record and shared by
    every sample of its group (see :meth:`select`). An editor fills ``tokens``/``ids`` (conditions on the sequence
    axis), ``channels`` (on the channel axis), or both."""

    target_ids: torch.Tensor  # [N, 3]
    text: TextEmbeds
    grid: tuple[int, int]  # target latent grid (h, w) before packing
    tokens: torch.Tensor | None = None  # [B, M, C] packed condition latents after the target tokens
    ids: torch.Tensor | None = None  # [M, 3] their RoPE ids
    channels: torch.Tensor | None = None  # [B, N, C'] concatenated to each target token's channels
    negative: TextEmbeds | None = None  # for true classifier-free guidance

    @property
    def num_target_tokens(self) -> int:
        return self.target_ids.shape[0]

    @property
    def batch_size(self) -> int:
        return self.text.prompt_embeds.shape[0]

    def select(self, index: torch.Tensor | slice) -> Conditions:
        def pick(t):
            return None if t is None else t[index]

        return replace(
            self,
            tokens=pick(self.tokens),
            channels=pick(self.channels),
            text=self.text.select(index),
            negative=None if self.negative is None else self.negative.select(index),
        )


class FluxPolicy:
    """A FLUX.1 editor seen as a policy over latent trajectories (subclasses: one per FLUX.1 pipeline).

    Frozen parts (codec, text encoders) stay in ``eval()`` with no grad; only ``transformer`` trains (its LoRA
    adapter, or all of it)."""

    kind: ClassVar[str] = ""  # the name in ``tiny-<kind>`` and the saved model settings
    pipeline_class_name: ClassVar[str] = ""  # the diffusers pipeline this editor is (model_index.json's _class_name)
    condition_fields: ClassVar[tuple[str, ...]] = ()  # batch columns :meth:`encode_batch` reads
    default_guidance_scale: ClassVar[float] = 3.5

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
        guidance_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        scheduler_config: dict | None = None,
    ):
        self.transformer = transformer
        self.codec = codec
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        self.dtype = dtype
        self.scheduler_config = dict(FLUX_SCHEDULER if scheduler_config is None else scheduler_config)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in (codec, text_encoder, text_encoder_2):
            if m is not None:
                m.eval().requires_grad_(False)

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32, *, guidance_scale: float | None = None, **overrides):
        """A tiny editor of this kind with random weights (see :mod:`refiner_rl.policies.tiny`). ``overrides`` are
        the subclass's own options (e.g. Kontext's ``reference_id``) and :class:`~refiner_rl.policies.tiny.TinySpec`
        fields."""
        from refiner_rl.policies.tiny import tiny_components

        options = {k: overrides.pop(k) for k in cls.option_names() if k in overrides}
        c = tiny_components(kind=cls.kind, **overrides)
        return cls(
            c["transformer"],
            c["codec"],
            c["text_encoder"],
            c["tokenizer"],
            c["text_encoder_2"],
            c["tokenizer_2"],
            max_sequence_length=c["max_sequence_length"],
            guidance_scale=guidance_scale,
            dtype=dtype,
            **options,
        )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Constructor options of this editor beyond the shared ones (model settings that travel with it)."""
        return ()

    def options(self) -> dict:
        """This editor's own settings (:meth:`option_names`) as they are now."""
        return {k: getattr(self, k) for k in self.option_names()}

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
        guidance_scale: float | None = None,
        load_text_encoders: bool = True,
        **options,
    ):
        """Load from a diffusers repo id or a local folder in the pipeline's layout (``transformer/``, ``vae/``,
        ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, and ``scheduler/`` when present).

        Weights load from safetensors only. ``transformer_path`` points at a separately saved transformer (a full
        fine-tune written by ``save_pretrained``). ``options``: the subclass's own (:meth:`option_names`)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        if os.path.isdir(name_or_path):
            missing = [d for d in ("transformer", "vae") if not os.path.isdir(os.path.join(name_or_path, d))]
            if missing:
                raise MissingFileError(
                    f"model folder {name_or_path!r} lacks {missing}; expected the diffusers layout of "
                    f"{cls.pipeline_class_name} (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, "
                    "tokenizer_2/)"
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
            guidance_scale=guidance_scale,
            dtype=dtype,
            scheduler_config=_scheduler_config(name_or_path, revision),
            **options,
        )

    @property
    def pipeline_class(self):
        """The diffusers pipeline class this editor is (its LoRAs are written for its ``load_lora_weights``)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline(self):
        """This editor as its diffusers pipeline (components shared, not copied; needs an ``AutoencoderKL`` codec)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(self.codec, VAECodec):
            raise ValueError(
                f"only editors with an AutoencoderKL codec can be built as {self.pipeline_class_name}; this one has "
                f"{type(self.codec).__name__}"
            )
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.codec.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=_unwrap(self.transformer),
        )

    def save_pretrained_components(self, path: str) -> None:
        """Write the editor as its diffusers pipeline folder (``model_index.json`` and every component), so
        :meth:`from_pretrained` and diffusers' own ``from_pretrained`` reload it."""
        self.pipeline().save_pretrained(path, safe_serialization=True)

    # ---------------------------------------------------------------------------------------------- devices
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device):
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
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the codec's downsampling times the 2x2 packing."""
        return self.codec.downsample * 2

    @property
    def latent_channels(self) -> int:
        """Channels of one packed target token (the velocity's last dimension)."""
        return self.codec.latent_channels * 4

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> packed latents ``[B, N, C]`` (fp32)."""
        self._check_size(images)
        latents = self.codec.encode(images.to(self.device))
        return pack_latents(latents.float())

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed latents -> images ``[B, 3, H, W]`` in [0, 1]."""
        return self.decode_with_grad(tokens, grid)

    def decode_with_grad(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """:meth:`decode` that lets gradients through the codec (for rewards differentiated into the latents)."""
        return self.codec.decode(unpack_latents(tokens.float(), *grid)).float()

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.codec.downsample
        return height // f, width // f

    def _check_size(self, images: torch.Tensor) -> None:
        m = self.size_multiple
        h, w = images.shape[-2:]
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be a multiple of {m} (codec downsample x 2x2 packing)")

    def mask_to_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask ``[B, 1, H, W]`` -> fraction of each target token covered by the mask, ``[B, N]``."""
        return F.avg_pool2d(mask.float().to(self.device), kernel_size=self.size_multiple).flatten(1)

    # ------------------------------------------------------------------------------------------- conditions
    def encode_conditions(self, *args, **kwargs) -> Conditions:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_batch(self, batch: dict, text: TextEmbeds, negative_prompts: list[str] | None = None) -> Conditions:
        """Conditions of a collated batch (one row per record) from its :attr:`condition_fields` columns."""
        missing = [k for k in self.condition_fields if k not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the batch columns {list(self.condition_fields)}; missing {missing}"
            )
        images = [batch[k].to(self.device) for k in self.condition_fields]
        return self.encode_conditions(*images, text=text, negative_prompts=negative_prompts)

    # ------------------------------------------------------------------------------------------- scheduler
    def sigmas(self, num_steps: int, num_tokens: int, start_sigma: float = 1.0) -> torch.Tensor:
        """The sampling schedule of this model's own scheduler config for ``num_tokens`` target tokens, scaled to
        start at ``start_sigma``: always ``num_steps`` steps, down to 0 (so an SDE window means the same steps)."""
        from refiner_rl.dynamics import sigma_schedule

        c = self.scheduler_config
        dynamic = bool(c.get("use_dynamic_shifting", False))
        sigmas = sigma_schedule(
            num_steps,
            image_seq_len=num_tokens if dynamic else None,
            shift=None if dynamic else c.get("shift"),
            use_dynamic_shifting=dynamic,
            base_seq_len=c.get("base_image_seq_len", 256),
            max_seq_len=c.get("max_image_seq_len", 4096),
            base_shift=c.get("base_shift", 0.5),
            max_shift=c.get("max_shift", 1.15),
        )
        return sigmas * float(start_sigma)

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

        The one forward of the project. ``transformer`` lets a trainer pass its wrapped (DDP/DeepSpeed) module.
        With ``true_cfg_scale > 1`` and negative embeddings, conditional and unconditional passes run as one batch
        and combine as ``v_u + s (v_c - v_u)``. Returns fp32."""
        model = transformer if transformer is not None else self.transformer
        n = x.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        hidden = x.to(self.dtype)
        if cond.channels is not None:
            hidden = torch.cat([hidden, cond.channels.to(self.dtype)], dim=2)
        ids = cond.target_ids
        if cond.tokens is not None:
            hidden = torch.cat([hidden, cond.tokens.to(self.dtype)], dim=1)
            ids = torch.cat([ids, cond.ids])
        ids = ids.to(self.dtype)
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
        """Write the adapter in the format this editor's pipeline's ``load_lora_weights`` reads."""
        model = _unwrap(self.transformer)
        metadata = model.peft_config["default"].to_dict()
        metadata = {k: (list(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        self.pipeline_class.save_lora_weights(
            path,
            transformer_lora_layers=self.lora_state_dict(state_dict),
            safe_serialization=True,
            transformer_lora_adapter_metadata=metadata,
        )

    def load_lora(self, path: str) -> None:
        """Load an adapter written by :meth:`save_lora` into the existing adapter (for resume)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        sd = self.pipeline_class.lora_state_dict(path)
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


def _scheduler_config(name_or_path: str, revision: str | None) -> dict | None:
    """The model's own ``scheduler/scheduler_config.json`` (a local folder, or the hub through diffusers), or None
    (then the FLUX.1 default) when it has none."""
    local = os.path.join(name_or_path, "scheduler", "scheduler_config.json")
    if os.path.isdir(name_or_path):
        if not os.path.isfile(local):
            return None
        with open(local) as f:
            return json.load(f)
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(name_or_path, subfolder="scheduler", revision=revision))
    except OSError:
        logger.warning("%s has no scheduler config; using the FLUX.1 default schedule", name_or_path)
        return None
