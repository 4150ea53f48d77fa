"""What every diffusers editor shares, whatever its transformer: options, LoRA, the codec round trip, devices.

An editor (:mod:`refiner_rl.policies.flux` for the FLUX.1 family, :mod:`refiner_rl.policies.qwen_edit` for
Qwen-Image-Edit Plus) is a diffusers transformer over 2x2-packed latent tokens, a codec, and text encoders. This base
holds the parts that do not depend on how conditions and text reach the transformer:

- options (:meth:`LatentEditor.option_names`) and the diffusers pipeline class the editor is;
- devices and frozen parts (:meth:`LatentEditor.frozen_modules` stay in ``eval()`` with no grad);
- the codec round trip between ``[0, 1]`` images and packed tokens, sizes and the mask on the token grid;
- :meth:`LatentEditor.encode_batch`, which hands a batch's :attr:`condition_fields` columns to the subclass's
  ``encode_conditions``;
- LoRA: a peft adapter on the transformer, saved and loaded in the format the pipeline's ``load_lora_weights`` reads.

A subclass writes loading, text encoding, ``encode_conditions``, ``sigmas`` and ``velocity``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from refiner_rl.errors import DataError, MissingFileError

logger = logging.getLogger(__name__)


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


class LatentEditor:
    """An editor seen as a policy over packed latent tokens (the interface is
    :class:`refiner_rl.policies.base.EditorPolicy`). Subclasses set ``transformer``, ``codec``, ``dtype`` and
    ``guidance_scale`` in their constructor; only ``transformer`` trains (its LoRA adapter, or all of it)."""

    kind: ClassVar[str] = ""  # the name in ``tiny-<kind>`` and the saved model settings
    pipeline_class_name: ClassVar[str] = ""  # the diffusers pipeline this editor is (model_index.json's _class_name)
    transformer_class_name: ClassVar[str] = ""  # its diffusers transformer class (for a saved full fine-tune)
    condition_fields: ClassVar[tuple[str, ...]] = ()  # batch columns :meth:`encode_batch` reads
    max_references: ClassVar[int | None] = 1  # references a record may have (None: any number)
    default_guidance_scale: ClassVar[float] = 3.5
    default_lora_targets: ClassVar[tuple[str, ...]] = ()  # :meth:`add_lora`'s targets when none are named

    transformer: nn.Module
    codec: nn.Module
    dtype: torch.dtype

    def frozen_modules(self) -> list[nn.Module]:
        """The parts that never train (codec, text encoders): kept in ``eval()`` with no grad, moved by :meth:`to`."""
        return [self.codec]

    def _freeze(self) -> None:
        for m in self.frozen_modules():
            if m is not None:
                m.eval().requires_grad_(False)

    def _clear_caches(self) -> None:
        """Forget what was computed on the old device (text embeddings)."""

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
        if not os.path.isdir(path):
            raise MissingFileError(
                f"transformer folder {path!r} does not exist (expected a save_pretrained output with config.json)"
            )
        import diffusers

        model_class = getattr(diffusers, self.transformer_class_name)
        loaded = model_class.from_pretrained(path, torch_dtype=self.dtype, use_safetensors=True)

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

    @property
    def pipeline_class(self):
        """The diffusers pipeline class this editor is (its LoRAs are written for its ``load_lora_weights``)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline(self):
        """This editor as its diffusers pipeline (components shared, not copied): scheduler, VAE, the text components
        (:meth:`text_components`) and the transformer. Needs the codec to hold the pipeline's VAE (not the tiny pixel
        codec)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        vae = getattr(self.codec, "vae", None)
        if vae is None:
            raise ValueError(
                f"only editors with a VAE codec can be built as {self.pipeline_class_name}; this one has "
                f"{type(self.codec).__name__}"
            )
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=vae,
            transformer=unwrap(self.transformer),
            **self.text_components(),
        )

    def text_components(self) -> dict:
        """The pipeline's text encoder(s), tokenizer(s) or processor, by their pipeline argument names."""
        raise NotImplementedError

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
        for m in self.frozen_modules():
            if m is not None:
                m.to(device)
        self._clear_caches()
        return self

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
    def encode_conditions(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def condition_columns(self, batch: dict) -> list[str]:
        """The batch columns :meth:`encode_batch` hands on, in order: :attr:`condition_fields`, where ``reference``
        stands for every reference of records with several (``reference``, ``reference_2``, ...). A
        :class:`DataError` naming the records when they carry more references than this editor takes
        (:attr:`max_references`)."""
        from refiner_rl.data.records import reference_columns

        refs = reference_columns(batch)
        if self.max_references is not None and len(refs) > self.max_references:
            rows = batch["index"].tolist() if "index" in batch else list(range(len(batch["prompt"])))
            raise DataError(
                f"records {rows} have {len(refs)} references each, but {type(self).__name__} takes "
                f"{'one' if self.max_references == 1 else self.max_references}; give each record a single reference "
                "or train an editor that takes several (Qwen-Image-Edit Plus)"
            )
        return [c for k in self.condition_fields for c in (refs if k == "reference" and refs else [k])]

    def encode_batch(self, batch: dict, text, negative_prompts: list[str] | None = None):
        """Conditions of a collated batch (one row per record) from its :meth:`condition_columns`."""
        missing = [k for k in self.condition_fields if k not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the batch columns {list(self.condition_fields)}; missing {missing}"
            )
        images = [batch[k].to(self.device) for k in self.condition_columns(batch)]
        return self.encode_conditions(*images, text=text, negative_prompts=negative_prompts)

    # ------------------------------------------------------------------------------------------------- LoRA
    def add_lora(
        self,
        rank=16,
        alpha: float | None = None,
        target_modules=None,
        dropout: float = 0.0,
        init: str | bool = True,
    ) -> None:
        """Attach a peft LoRA adapter to the transformer (base weights frozen). ``rank`` may be a whole peft
        ``LoraConfig`` (the other arguments are then unused); without ``target_modules`` (None) it gets
        :attr:`default_lora_targets`. Names pass through :meth:`lora_targets` first."""
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("the transformer already has a LoRA adapter: attach one adapter only")
        if isinstance(rank, LoraConfig):
            cfg = rank
            targets = self.default_lora_targets if cfg.target_modules is None else cfg.target_modules
            cfg = replace(cfg, target_modules=self.lora_targets(targets))
        else:
            cfg = LoraConfig(
                r=rank,
                lora_alpha=alpha if alpha is not None else rank,
                lora_dropout=dropout,
                target_modules=self.lora_targets(
                    self.default_lora_targets if target_modules is None else target_modules
                ),
                init_lora_weights=init,
            )
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(cfg)

    def lora_targets(self, names):
        """The module names ``names`` stand for in this editor's transformer (a subclass maps another family's); a
        string is peft's regex over the full names and passes as it is."""
        return names if isinstance(names, str) else set(names)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(unwrap(self.transformer), "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def adapter_disabled(self, transformer: nn.Module | None = None):
        """The reference policy for KL: the same transformer with the LoRA adapter switched off."""
        model = unwrap(transformer if transformer is not None else self.transformer)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    def lora_state_dict(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unwrap(self.transformer), state_dict=state_dict)

    def save_lora(self, path: str, state_dict: dict | None = None) -> None:
        """Write the adapter in the format this editor's pipeline's ``load_lora_weights`` reads."""
        model = unwrap(self.transformer)
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
            unwrap(self.transformer), convert_unet_state_dict_to_peft(sd), adapter_name="default"
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA at {path!r} does not match this transformer: unexpected keys {unexpected[:5]}")


def load_transformer_and_vae(
    name_or_path: str,
    transformer_class,
    vae_class,
    *,
    dtype: torch.dtype,
    revision: str | None,
    transformer_path: str | None,
    layout: str,
):
    """``(transformer, vae)`` of a diffusers pipeline repo id or local folder (``transformer/`` and ``vae/``;
    safetensors only), the transformer from ``transformer_path`` when given (a full fine-tune written by
    ``save_pretrained``). A local folder without them is a MissingFileError naming the expected ``layout``."""
    if os.path.isdir(name_or_path):
        missing = [d for d in ("transformer", "vae") if not os.path.isdir(os.path.join(name_or_path, d))]
        if missing:
            raise MissingFileError(
                f"model folder {name_or_path!r} lacks {missing}; expected the diffusers layout {layout}"
            )
    common = dict(torch_dtype=dtype, use_safetensors=True)
    if transformer_path:
        transformer = transformer_class.from_pretrained(transformer_path, **common)
    else:
        transformer = transformer_class.from_pretrained(
            name_or_path, subfolder="transformer", revision=revision, **common
        )
    vae = vae_class.from_pretrained(name_or_path, subfolder="vae", revision=revision, **common)
    return transformer, vae


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def scheduler_config(name_or_path: str, revision: str | None) -> dict | None:
    """The model's own ``scheduler/scheduler_config.json`` (a local folder, or the hub through diffusers), or None
    (then the editor's default) when it has none."""
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
        logger.warning("%s has no scheduler config; using the editor's default schedule", name_or_path)
        return None
