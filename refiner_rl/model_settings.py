"""Settings that belong to a trained model and travel with it (``refiner_rl_model.json``).

A model trained with registered references (``reference_alignment: register``) or with other reference RoPE
positions (``reference_positions``) must be served the same way. The trainers write this file next to the weights
(final output and every ``checkpoint-N``); ``refiner-rl edit``, ``refiner-rl eval`` and a resume read it. A setting
the user leaves unset (``None``) takes the saved value (else the old default); one set explicitly to another value
than the saved one is a :class:`~refiner_rl.errors.ConfigError` naming both values and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field

from refiner_rl.errors import CheckpointError, ConfigError

SETTINGS_FILE = "refiner_rl_model.json"
# What an unset setting means for a model without the file (the defaults before the file existed).
DEFAULTS = {"reference_alignment": "none", "reference_positions": "grid"}
SAMPLER_KEYS = ("num_inference_steps", "start_sigma", "true_cfg_scale", "paste_back")


@dataclass
class ModelSettings:
    """What a trained model must be served with, and the sampler its run evaluated with (``sampler``)."""

    kind: str = "kontext"
    reference_alignment: str = "none"
    reference_positions: str = "grid"
    reference_id: int = 2
    guidance_scale: float | None = None
    registration_scale_range: list[float] | None = None
    sampler: dict = field(default_factory=dict)
    # what the weights sit on: model_name_or_path, revision, transformer_path (a LoRA's full fine-tune under it),
    # tiny_model; None when the policy was not built by build_policy (``refiner-rl refine`` then asks for it)
    base_model: dict | None = None
    # the editor's own options beyond the fields above (Qwen-Image-Edit: vl_condition_area, vae_condition_area)
    editor_options: dict = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)  # the file it was read from (not written)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out


def _check(settings: ModelSettings, where: str, error=ConfigError) -> ModelSettings:
    from refiner_rl.data.records import REFERENCE_ALIGNMENTS
    from refiner_rl.policies.kontext import REFERENCE_POSITIONS

    if settings.reference_alignment not in REFERENCE_ALIGNMENTS:
        raise error(
            f"{where}: reference_alignment must be one of {', '.join(REFERENCE_ALIGNMENTS)}, got {settings.reference_alignment!r}"
        )
    if settings.reference_positions not in REFERENCE_POSITIONS:
        raise error(
            f"{where}: reference_positions must be one of {', '.join(REFERENCE_POSITIONS)}, got {settings.reference_positions!r}"
        )
    return settings


def save(settings: ModelSettings, folder: str) -> str:
    """Write ``folder/refiner_rl_model.json`` atomically (a temporary file renamed over it); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SETTINGS_FILE)
    fd, tmp = tempfile.mkstemp(prefix=f".{SETTINGS_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(settings.as_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(folder: str | None) -> ModelSettings | None:
    """The settings saved in ``folder`` (a trainer's output or checkpoint folder); None when it holds no
    ``refiner_rl_model.json`` (a model from before the file, a base model). A corrupt file is a CheckpointError."""
    if not folder or not os.path.isdir(folder):
        return None
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON object was expected, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(ModelSettings)} - {"path"}
        settings = ModelSettings(**{k: v for k, v in raw.items() if k in known}, path=path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a refiner-rl model settings file ({e})") from e
    return _check(settings, path, CheckpointError)


def merge(saved: ModelSettings | None, explicit: dict, defaults: dict | None = None) -> dict:
    """The values to serve with: for each ``{name: value}`` of ``explicit``, the value when set (not None), else the
    saved one, else ``defaults[name]`` (default :data:`DEFAULTS`). An explicit value that disagrees with the saved
    one raises ConfigError naming both and the file."""
    defaults = DEFAULTS if defaults is None else defaults
    out = {}
    for name, value in explicit.items():
        stored = getattr(saved, name) if saved is not None else None
        if value is not None and stored is not None and value != stored:
            raise ConfigError(
                f"{name} {value!r} disagrees with {stored!r}, the setting the model was trained with "
                f"({saved.path or SETTINGS_FILE}): drop --{name} to use the model's own, or give {stored!r}"
            )
        out[name] = value if value is not None else stored if stored is not None else defaults.get(name)
    return out


def sampler_defaults(args) -> dict:
    """The sampler settings a training config evaluated with (those of :data:`SAMPLER_KEYS` it has; SFT's sample
    grids: ``sample_inference_steps`` as ``num_inference_steps``; ``focus``: the region-focus settings when
    ``focus_crop`` is on)."""
    out = {k: getattr(args, k) for k in SAMPLER_KEYS if hasattr(args, k)}
    if "num_inference_steps" not in out and hasattr(args, "sample_inference_steps"):
        out["num_inference_steps"] = args.sample_inference_steps
    focus = args.focus_settings() if hasattr(args, "focus_settings") else None
    if focus is not None:
        out["focus"] = dataclasses.asdict(focus)
    return out


def of_run(policy, dataset, args) -> ModelSettings:
    """The settings of a training run: its policy, its training dataset and its config."""
    registration = getattr(dataset, "registration", None) or {}
    scale_range = registration.get("scale_range")
    guidance = getattr(policy, "guidance_scale", None)
    return ModelSettings(
        kind=str(getattr(policy, "kind", "kontext")),
        reference_alignment=getattr(dataset, "reference_alignment", None) or DEFAULTS["reference_alignment"],
        reference_positions=getattr(policy, "reference_positions", None) or DEFAULTS["reference_positions"],
        reference_id=int(getattr(policy, "reference_id", 2)),
        guidance_scale=float(guidance) if guidance is not None else None,
        registration_scale_range=[float(v) for v in scale_range] if scale_range else None,
        sampler=sampler_defaults(args),
        base_model=dict(policy.base_model) if getattr(policy, "base_model", None) else None,
        editor_options=editor_options(policy),
    )


def editor_options(policy) -> dict:
    """The policy's own options (``policy.options()``) that no other field of :class:`ModelSettings` holds."""
    own = {f.name for f in dataclasses.fields(ModelSettings)}
    options = policy.options() if hasattr(policy, "options") else {}
    return {k: v for k, v in options.items() if k not in own}


def merge_options(saved: ModelSettings | None, explicit: dict | None, what: str = "the model") -> dict:
    """``editor_options`` to serve with: the saved ones, with the explicitly given ones added; an explicit option
    that disagrees with the saved one raises ConfigError naming both and the file."""
    stored = dict(saved.editor_options) if saved is not None else {}
    for name, value in (explicit or {}).items():
        if name in stored and stored[name] != value:
            raise ConfigError(
                f"editor_options {name} {value!r} disagrees with {stored[name]!r}, the option {what} was trained "
                f"with ({saved.path or SETTINGS_FILE}): drop it to use the model's own, or give {stored[name]!r}"
            )
    return {**stored, **(explicit or {})}


def check_same(saved: ModelSettings | None, current: ModelSettings, what: str) -> None:
    """ConfigError when ``current`` (a run about to resume) serves the model otherwise than ``saved`` says."""
    if saved is None:
        return
    for name in ("kind", "reference_alignment", "reference_positions", "reference_id", "editor_options"):
        if getattr(saved, name) != getattr(current, name):
            raise ConfigError(
                f"{what}: {name} {getattr(current, name)!r} disagrees with {getattr(saved, name)!r}, the setting "
                f"the checkpoint was trained with ({saved.path}): resume with {name} {getattr(saved, name)!r}"
            )


def check_kind(saved: ModelSettings | None, model_name_or_path: str, what: str, revision: str | None = None) -> None:
    """ConfigError when a checkpoint of one editor kind (``kontext``, ``fill``) is put over a base model of another:
    its weights would not fit that transformer."""
    if saved is None:
        return
    from refiner_rl.policies import policy_class

    base = policy_class(model_name_or_path, revision).kind
    if base != saved.kind:
        raise ConfigError(
            f"{what} was trained as a {saved.kind!r} editor ({saved.path}) but its base model {model_name_or_path!r} "
            f"is a {base!r} editor: give the base model it was trained from"
        )
