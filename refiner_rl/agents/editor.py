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
import os

import torch

from refiner_rl.errors import CheckpointError

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
    """The :class:`~refiner_rl.configs.ModelArguments` that rebuild the editor stored at ``path``."""
    from refiner_rl.configs import ModelArguments
    from refiner_rl.policies.base import TINY_EDITORS

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
        return ModelArguments(
            model_name_or_path=base, **{**common, "use_lora": True, "init_lora_path": path, **_lora_settings(path)}
        )
    raise CheckpointError(
        f"editor {path!r} holds neither transformer/ (a full fine-tune or a diffusers pipeline folder) nor "
        f"{LORA_FILE} (a LoRA); point --editor at a checkpoint folder written by refiner-rl"
    )


def load_editor(
    path: str,
    *,
    base: str = "tiny",
    device: str | torch.device = "cpu",
    torch_dtype: str = "auto",
    reference_alignment: str | None = None,
    reference_positions: str | None = None,
):
    """The frozen editor policy at ``path`` (see the module docstring), in eval mode on ``device``, served with the
    settings saved with it (``refiner_rl_model.json``): ``reference_alignment`` (kept as the policy's attribute of
    that name, :func:`apply_edit` reads it), ``reference_positions``, ``reference_id`` and ``guidance_scale``.
    ``reference_alignment`` / ``reference_positions`` given here (None = unset) must agree with the saved ones."""
    from refiner_rl import model_settings
    from refiner_rl.configs import build_policy
    from refiner_rl.policies.base import TINY_EDITORS

    saved = model_settings.load(path) if path not in TINY_EDITORS else None
    values = model_settings.merge(
        saved, {"reference_alignment": reference_alignment, "reference_positions": reference_positions}
    )
    overrides = {"torch_dtype": torch_dtype, "reference_positions": values["reference_positions"]}
    if saved is not None:  # edit has no flags for these: the model's own
        overrides["reference_id"] = saved.reference_id
        if saved.guidance_scale is not None:
            overrides["guidance_scale"] = saved.guidance_scale
    args = editor_arguments(path, base, **overrides)
    model_settings.check_kind(saved, args.model_name_or_path, f"editor {path!r}")
    try:
        policy = build_policy(args, device)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"editor {path!r} (base {base!r}) does not load: {str(err).splitlines()[0]}") from err
    policy.transformer.eval().requires_grad_(False)
    policy.reference_alignment = values["reference_alignment"]
    scale_range = saved.registration_scale_range if saved is not None else None
    policy.reference_registration = {"scale_range": tuple(scale_range)} if scale_range else {}
    return policy


def sample_edit(policy, batch: dict, *, num_steps: int, seed: int) -> torch.Tensor:
    """Edited images ``[B, 3, H, W]`` from the project's sampler (the one adapter between agents and sampling)."""
    from refiner_rl.sampling import sample_images

    return sample_images(policy, batch, num_steps=num_steps, seed=seed)


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
def apply_edit(policy, image, instruction: str, reference=None, *, num_steps: int = 10, seed: int = 0):
    """One edit: ``image`` (the draft) edited by ``instruction``, conditioned on ``reference`` (default: the image
    itself; an editor trained with ``reference_alignment: register`` gets it registered to the image and warped
    into its frame); returns a PIL image of the same size."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    draft = pil_to_tensor(image.convert("RGB"))[None].float() / 255.0
    mask = torch.ones_like(draft[:, :1])
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
