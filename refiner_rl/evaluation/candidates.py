"""Named candidates of an evaluation and how each becomes a policy.

A candidate is a recipe entry ``{name: ..., checkpoint: ...}`` (or just a name):

- ``checkpoint: draft``: the draft itself (no sampling), the row every other is compared with;
- ``checkpoint: base`` (the default): the base editor of ``model_name_or_path`` (for ``tiny``: its random init);
- a folder the trainers write: a LoRA (``pytorch_lora_weights.safetensors``, loaded onto the base editor, or onto
  the candidate's own ``transformer_path`` when the LoRA was trained on a fully fine-tuned transformer), a full
  fine-tune (``transformer/`` inside it, or the ``transformer`` folder itself), or a GRPO output's EMA weights
  (``ema: true`` reads ``<checkpoint>/ema``, which holds either of the two).

A checkpoint folder holding ``refiner_rl_model.json`` (see :mod:`refiner_rl.model_settings`) is served with the
``reference_alignment`` and ``reference_positions`` saved there unless the recipe sets them (:func:`candidate_settings`).

Loading errors (missing folder, neither format, a checkpoint of another shape) raise
:class:`~refiner_rl.errors.CheckpointError` naming the candidate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from refiner_rl.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
SPECIAL = ("draft", "base")


@dataclass
class Candidate:
    name: str
    checkpoint: str = "base"
    transformer_path: str | None = None
    ema: bool = False

    @property
    def is_draft(self) -> bool:
        return self.checkpoint == "draft"


def parse_candidates(specs) -> list[Candidate]:
    """Candidates from the recipe's list (entries: a name, or a mapping with ``name``, ``checkpoint``,
    ``transformer_path``, ``ema``); names must be unique."""
    if isinstance(specs, str):
        specs = json.loads(specs)
    if not specs:
        raise ConfigError("`candidates` is empty: list at least one, e.g. [{name: draft, checkpoint: draft}]")
    out = []
    for spec in specs:
        if isinstance(spec, str):
            spec = {"name": spec, "checkpoint": spec if spec in SPECIAL else "base"}
        if not isinstance(spec, dict) or not spec.get("name"):
            raise ConfigError(f"candidate entry {spec!r} needs a `name`")
        known = {f.name for f in dataclasses.fields(Candidate)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"candidate {spec['name']!r}: unknown key(s) {unknown}; known: {sorted(known)}")
        out.append(Candidate(**{k: v for k, v in spec.items() if v is not None}))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"candidate name(s) {dup} appear twice: names label the table's rows")
    return out


def resolve_weights(c: Candidate) -> tuple[str, str | None]:
    """``("base" | "lora" | "full", path)`` of a candidate's checkpoint; CheckpointError naming it otherwise."""
    if c.checkpoint in SPECIAL:
        return "base", None
    path = os.path.join(c.checkpoint, "ema") if c.ema else c.checkpoint
    if not os.path.isdir(path):
        raise CheckpointError(
            f"candidate {c.name!r}: checkpoint folder {path!r} does not exist"
            + (" (ema: true reads the ema/ folder a GRPO run with ema_decay > 0 writes)" if c.ema else "")
        )
    if os.path.isfile(os.path.join(path, LORA_FILE)):
        return "lora", path
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):
        return "full", os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "full", path
    raise CheckpointError(
        f"candidate {c.name!r}: {path!r} holds neither a LoRA ({LORA_FILE}) nor a transformer (transformer/config.json "
        "or config.json): point `checkpoint` at a trainer's output folder or one of its checkpoint-N folders"
    )


def lora_settings(path: str) -> dict:
    """``lora_r``, ``lora_alpha``, ``lora_target_modules`` of a saved adapter (from its safetensors metadata)."""
    from diffusers.loaders import FluxLoraLoaderMixin  # the LoRA format of every FLUX.1 pipeline

    _, meta = FluxLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in (meta or {}).items()}
    if "r" not in meta or "target_modules" not in meta:
        raise CheckpointError(f"LoRA {path!r} carries no adapter metadata (rank, targets): re-save it with the trainer")
    return {
        "lora_r": int(meta["r"]),
        "lora_alpha": float(meta.get("lora_alpha") or meta["r"]),
        "lora_target_modules": sorted(meta["target_modules"]),
    }


def check_candidate(c: Candidate) -> tuple[str, str | None]:
    """:func:`resolve_weights` plus the ``transformer_path`` check: every path error before any model loads."""
    if c.transformer_path and not os.path.isdir(c.transformer_path):
        raise CheckpointError(f"candidate {c.name!r}: transformer_path {c.transformer_path!r} does not exist")
    return resolve_weights(c)


def candidate_settings(c: Candidate, model_args, reference_alignment: str | None = None) -> dict:
    """How the candidate is served: ``reference_alignment``, ``reference_positions`` and ``registration`` (a
    TripletDataset's registration options, or None), from the explicit settings (``reference_alignment``, the
    data's; ``model_args.reference_positions``; None = unset) and the ``refiner_rl_model.json`` saved with its
    checkpoint. None where neither says (the dataset's and the model's defaults apply); ConfigError naming the
    candidate when an explicit setting disagrees with the saved one."""
    from refiner_rl import model_settings

    saved = None if c.checkpoint in SPECIAL else model_settings.load(c.checkpoint)
    explicit = {"reference_alignment": reference_alignment, "reference_positions": model_args.reference_positions}
    try:
        values = model_settings.merge(saved, explicit, defaults={})
        model_settings.check_kind(saved, model_args.model_name_or_path, "the checkpoint", model_args.revision)
    except ConfigError as err:
        raise ConfigError(f"candidate {c.name!r}: {err}") from err
    values["registration"] = None
    if saved is not None and reference_alignment is None and saved.registration_scale_range:
        values["registration"] = {"scale_range": tuple(saved.registration_scale_range)}
    if saved is not None and saved.reference_id != model_args.reference_id:
        logger.warning(
            "candidate %r was trained with reference_id %s (%s); evaluating it with reference_id %s",
            c.name,
            saved.reference_id,
            saved.path,
            model_args.reference_id,
        )
    return values


def load_candidate(c: Candidate, model_args, device):
    """The candidate's policy (``None`` for the draft), built from the base ``model_args`` (a ``ModelArguments``)."""
    from refiner_rl.configs import build_policy

    if c.is_draft:
        return None
    kind, path = check_candidate(c)
    args = dataclasses.replace(model_args, use_lora=False, init_lora_path=None)
    if c.checkpoint not in SPECIAL:  # served with the editor options it was trained with
        from refiner_rl import model_settings

        try:
            saved = model_settings.load(c.checkpoint)
            args.editor_options = model_settings.merge_options(saved, model_args.editor_options, "the checkpoint")
        except ConfigError as err:
            raise ConfigError(f"candidate {c.name!r}: {err}") from err
    if c.transformer_path:
        args.transformer_path = c.transformer_path
    try:
        if kind == "full":
            args.transformer_path = path
        elif kind == "lora":
            args = dataclasses.replace(args, use_lora=True, init_lora_path=path, **lora_settings(path))
        policy = build_policy(args, device)
    except CheckpointError as err:
        raise CheckpointError(f"candidate {c.name!r}: {err}") from err
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        raise CheckpointError(
            f"candidate {c.name!r}: cannot load {path or model_args.model_name_or_path!r} into "
            f"{model_args.model_name_or_path!r} ({' '.join(str(err).split())[:300]})"
        ) from err
    policy.transformer.eval()
    return policy
