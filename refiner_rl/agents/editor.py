"""The editing agent: a frozen editor loaded from any checkpoint the project writes, applied one step at a time.

Editor paths (:func:`load_editor`):

- ``tiny``: the random tiny editor (tests, CPU demos);
- a diffusers pipeline folder of an editor that takes a reference (``FluxKontextPipeline``: ``transformer/`` and
  ``vae/``, text encoders beside them);
- a full fine-tune's output folder (``transformer/`` only, as ``refiner-rl sft`` / ``grpo`` write without LoRA),
  over ``base`` (default ``tiny``; give the model it was trained from);
- a LoRA folder (``pytorch_lora_weights.safetensors``, as the trainers write with LoRA), over ``base``; rank,
  alpha and target modules are read from the adapter's own metadata.

Anything else, or a checkpoint that does not load, is a :class:`~refiner_rl.errors.CheckpointError` naming
the path, raised before any planning is done. A checkpoint folder holding ``refiner_rl_model.json`` (the trainers
write it) is served as it was trained: references registered to the image when it was trained with
``reference_alignment: register``, its ``reference_positions``, ``reference_id`` and ``guidance_scale``.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from refiner_rl.errors import CheckpointError

logger = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"


def _lora_settings(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(path, LORA_FILE), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")}
    if not meta.get("r") or not meta.get("target_modules"):
        raise CheckpointError(
            f"editor LoRA {path!r}: {LORA_FILE} has no adapter metadata (rank, target modules); save it with "
            "refiner-rl's trainers or diffusers' save_lora_weights(transformer_lora_adapter_metadata=...)"
        )
    return {
        "lora_r": int(meta["r"]),
        "lora_alpha": meta.get("lora_alpha"),
        "lora_target_modules": list(meta["target_modules"]),
    }


def editor_arguments(path: str, base: str = "tiny", **overrides):
    """The :class:`~refiner_rl.configs.ModelArguments` that rebuild the editor stored at ``path``. ``overrides`` are
    ModelArguments fields; ``transformer_path`` applies to a LoRA only (the full fine-tune under it)."""
    from refiner_rl.configs import ModelArguments
    from refiner_rl.policies.base import TINY_EDITORS

    under_lora = overrides.pop("transformer_path", None)
    common = {"use_lora": False, **overrides}
    if path in TINY_EDITORS:
        return ModelArguments(model_name_or_path=path, **common)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"editor {path!r} is not a folder; give `tiny`, a diffusers pipeline folder, or a checkpoint folder written by refiner-rl"
        )
    has = {name: os.path.exists(os.path.join(path, name)) for name in ("transformer", "vae", LORA_FILE)}
    if has["transformer"] and has["vae"]:
        return ModelArguments(model_name_or_path=path, **common)
    if has["transformer"]:
        return ModelArguments(model_name_or_path=base, transformer_path=os.path.join(path, "transformer"), **common)
    if has[LORA_FILE]:
        lora = {"use_lora": True, "init_lora_path": path, "transformer_path": under_lora, **_lora_settings(path)}
        return ModelArguments(model_name_or_path=base, **{**common, **lora})
    raise CheckpointError(
        f"editor {path!r} holds neither transformer/ (a full fine-tune or a diffusers pipeline folder) nor "
        f"{LORA_FILE} (a LoRA); point --editor at a checkpoint folder written by refiner-rl"
    )


def serving_values(saved, explicit: dict, strict: bool = True) -> dict:
    """The settings to serve with (:func:`refiner_rl.model_settings.merge`). ``strict=False`` lets an explicit value
    override the saved one, with a warning naming both (``refiner-rl refine``: any saved setting can be forced)."""
    from refiner_rl import model_settings

    if strict or saved is None:
        return model_settings.merge(saved, explicit)
    forced = {k: v for k, v in explicit.items() if v is not None and v != getattr(saved, k)}
    for name, value in forced.items():
        logger.warning(
            "%s %r forced: the model was trained with %r (%s)", name, value, getattr(saved, name), saved.path
        )
    values = model_settings.merge(saved, {k: None if k in forced else v for k, v in explicit.items()})
    return {**values, **forced}


def load_editor(
    path: str,
    *,
    base: str | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: str = "auto",
    reference_alignment: str | None = None,
    reference_positions: str | None = None,
    strict: bool = True,
    transformer_path: str | None = None,
    tiny_model: dict | None = None,
    revision: str | None = None,
    guidance_scale: float | None = None,
):
    """The frozen editor policy at ``path`` (see the module docstring), in eval mode on ``device``, served with the
    settings saved with it (``refiner_rl_model.json``): ``reference_alignment`` (kept as the policy's attribute of
    that name, :func:`apply_edit` reads it), ``reference_positions``, ``reference_id``, ``guidance_scale`` and the
    sampler it was evaluated with (``policy.saved_sampler``, a dict).
    ``reference_alignment`` / ``reference_positions`` given here (None = unset) must agree with the saved ones, unless
    ``strict=False`` (then they win, with a warning).

    What a LoRA or full fine-tune sits on: ``base`` / ``transformer_path`` / ``tiny_model`` / ``revision`` when given,
    else the base model saved with it (``base_model``), else ``tiny``."""
    from refiner_rl import model_settings
    from refiner_rl.configs import build_policy
    from refiner_rl.policies.base import TINY_EDITORS

    saved = model_settings.load(path) if path not in TINY_EDITORS else None
    explicit = {"reference_alignment": reference_alignment, "reference_positions": reference_positions}
    values = serving_values(saved, explicit, strict)
    stored = (saved.base_model if saved is not None else None) or {}
    base = base or stored.get("model_name_or_path") or "tiny"
    overrides = {"torch_dtype": torch_dtype, "reference_positions": values["reference_positions"]}
    overrides["revision"] = revision if revision is not None else stored.get("revision")
    overrides["transformer_path"] = transformer_path or stored.get("transformer_path")
    overrides["tiny_model"] = tiny_model if tiny_model is not None else stored.get("tiny_model") or {}
    if saved is not None:  # edit has no flags for these: the model's own
        overrides["reference_id"] = saved.reference_id
        overrides["editor_options"] = dict(saved.editor_options)
        if saved.guidance_scale is not None:
            overrides["guidance_scale"] = saved.guidance_scale
    if guidance_scale is not None:
        overrides["guidance_scale"] = guidance_scale
    under = overrides["transformer_path"]
    if under and os.path.isfile(os.path.join(path, LORA_FILE)) and not os.path.isdir(under):
        raise CheckpointError(f"editor {path!r}: {under!r}, the fine-tuned transformer under its LoRA, does not exist")
    args = editor_arguments(path, base, **overrides)
    model_settings.check_kind(saved, args.model_name_or_path, f"editor {path!r}")
    try:
        policy = build_policy(args, device)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"editor {path!r} (base {base!r}{f', transformer {under!r}' if under else ''}) does not load: "
            f"{str(err).splitlines()[0]} (give the base model it was trained from)"
        ) from err
    policy.transformer.eval().requires_grad_(False)
    policy.reference_alignment = values["reference_alignment"]
    scale_range = saved.registration_scale_range if saved is not None else None
    policy.reference_registration = {"scale_range": tuple(scale_range)} if scale_range else {}
    policy.saved_sampler = dict(saved.sampler) if saved is not None else {}
    return policy


def sample_edit(policy, batch: dict, *, num_steps: int | None, seed: int) -> torch.Tensor:
    """Edited images ``[B, 3, H, W]`` from the project's sampler (the one adapter between agents and sampling): the
    sampler ``refiner-rl refine`` serves the editor with (:func:`refiner_rl.refine.sampler_settings`: its saved start
    sigma, paste-back, true CFG, region focus and, unless ``num_steps`` is given, steps), noise keyed by ``(seed, i)``
    for sample ``i``, so an edit with a mask equals ``refine`` of the same image set."""
    from refiner_rl.evaluation.loop import sample_batch
    from refiner_rl.refine import sampler_settings

    sampler, _ = sampler_settings(
        getattr(policy, "saved_sampler", None) or {}, seed=seed, num_inference_steps=num_steps
    )
    return sample_batch(policy, {**batch, "index": torch.arange(len(batch["prompt"]))}, sampler)


def fit_image(image, policy, resolution: int | None = None):
    """``image`` (PIL) resized so both sides are multiples the editor takes (about ``resolution``^2 pixels when set)."""
    from refiner_rl.data.records import fit_size

    h, w = fit_size(image.height, image.width, resolution, policy.size_multiple)
    return image.convert("RGB") if (w, h) == image.size else image.convert("RGB").resize((w, h))


def register_to_draft(policy, draft: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``reference`` ``[3, Hr, Wr]`` registered to ``draft`` ``[3, H, W]`` inside ``mask`` and warped into its frame,
    as the training data served it (``reference_alignment: register``, :meth:`TripletDataset.align_reference`)."""
    from refiner_rl.data.registration import register_reference, warp_reference

    options = getattr(policy, "reference_registration", None) or {}
    s, ox, oy, _ = register_reference(draft, reference, mask, **options)
    return warp_reference(reference, (s, ox, oy), tuple(draft.shape[-2:]), "bilinear").clamp(0, 1)


@torch.no_grad()
def apply_edit(
    policy, image, instruction: str, reference=None, *, mask=None, num_steps: int | None = 10, seed: int = 0
):
    """One edit: ``image`` (the draft) edited by ``instruction`` inside ``mask`` (a PIL image, white = edit; resized to
    the image; default: the whole image), conditioned on ``reference`` (default: the image itself; an editor trained
    with ``reference_alignment: register`` gets it registered to the image inside the mask and warped into its
    frame); returns a PIL image of the same size."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    draft = pil_to_tensor(image.convert("RGB"))[None].float() / 255.0
    if mask is None:
        mask = torch.ones_like(draft[:, :1])
    else:
        m = mask.convert("L")
        m = m if m.size == image.size else m.resize(image.size, Image.NEAREST)
        mask = (pil_to_tensor(m)[None].float() / 255.0 >= 0.5).float()
    if reference is None:
        ref = draft
    elif getattr(policy, "reference_alignment", "none") == "register":
        ref = register_to_draft(policy, draft[0], pil_to_tensor(reference.convert("RGB")).float() / 255.0, mask[0])
        ref = ref[None]
    else:
        ref = pil_to_tensor(reference.convert("RGB").resize(image.size))[None].float() / 255.0
    batch = {"prompt": [instruction], "draft": draft, "reference": ref, "mask": mask}
    out = sample_edit(policy, batch, num_steps=num_steps, seed=seed)[0].float().clamp(0, 1).cpu()
    return Image.fromarray((out.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), mode="RGB")
