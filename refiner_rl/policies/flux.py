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

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from refiner_rl.policies.codec import Codec, VAECodec
from refiner_rl.policies.editor import (
    LatentEditor,
    load_transformer_and_vae,
    pack_latents,
    scheduler_config,
    unpack_latents,
    unwrap,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FLUX_SCHEDULER",
    "Conditions",
    "FluxPolicy",
    "TextEmbeds",
    "image_ids",
    "pack_latents",
    "unpack_latents",
]

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


class FluxPolicy(LatentEditor):
    """A FLUX.1 editor seen as a policy over latent trajectories (subclasses: one per FLUX.1 pipeline).

    Frozen parts (codec, text encoders) stay in ``eval()`` with no grad; only ``transformer`` trains (its LoRA
    adapter, or all of it). Options, LoRA and the codec round trip come from
    :class:`~refiner_rl.policies.editor.LatentEditor`."""

    transformer_class_name: ClassVar[str] = "FluxTransformer2DModel"
    default_guidance_scale: ClassVar[float] = 3.5
    default_lora_targets: ClassVar[tuple[str, ...]] = DEFAULT_LORA_TARGETS

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
        self._freeze()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.codec, self.text_encoder, self.text_encoder_2]

    def _clear_caches(self) -> None:
        self._text_cache.clear()

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

        transformer, vae = load_transformer_and_vae(
            name_or_path,
            FluxTransformer2DModel,
            AutoencoderKL,
            dtype=dtype,
            revision=revision,
            transformer_path=transformer_path,
            layout=f"of {cls.pipeline_class_name} (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, "
            "tokenizer_2/)",
        )
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
            scheduler_config=scheduler_config(name_or_path, revision),
            **options,
        )

    def text_components(self) -> dict:
        return {
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
        }

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
        cfg_obj = getattr(unwrap(model), "config", None)
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


def _load_t5_encoder(path, dtype, tkw):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, use_safetensors=True, **tkw)
