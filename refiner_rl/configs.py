"""Model and data arguments shared by every trainer (parsed with ``trl.TrlParser`` next to the trainer's
own config: ``TrlParser((ModelArguments, DataArguments, FlowSFTConfig))``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from refiner_rl.data.records import ReferenceAlignment
from refiner_rl.policies.flux import DEFAULT_LORA_TARGETS
from refiner_rl.policies.kontext import REFERENCE_POSITIONS, ReferencePositions


def _as_dict(value, name: str) -> dict:
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"`{name}` must be a mapping (YAML) or a JSON object string, got {value!r}") from e
    if not isinstance(out, dict):
        raise ValueError(f"`{name}` must be a mapping, got {type(out).__name__}")
    return out


@dataclass
class ModelArguments:
    """How to build the policy.

    Loading:
        model_name_or_path: ``tiny`` / ``tiny-kontext`` / ``tiny-fill`` / ``tiny-qwen-edit`` (random tiny editors,
            CPU), a diffusers repo id such as ``black-forest-labs/FLUX.1-Kontext-dev``,
            ``black-forest-labs/FLUX.1-Fill-dev`` or ``Qwen/Qwen-Image-Edit-2511``, or a local pipeline folder.
    Editor:
        editor_options: the editor's own options (Qwen-Image-Edit: ``vl_condition_area``, ``vae_condition_area``);
            saved with a trained model, which is then served with them.
    LoRA (peft):
        use_lora, lora_r, lora_alpha, lora_dropout, lora_target_modules, init_lora_path.
    """

    model_name_or_path: str = field(
        default="tiny",
        metadata={
            "help": "`tiny` / `tiny-fill` / `tiny-qwen-edit` (tiny random editors), a diffusers repo id, or a local "
            "pipeline folder."
        },
    )
    tiny_model: dict | str | None = field(
        default=None,
        metadata={
            "help": "Overrides of the tiny editor's shape (see refiner_rl.policies.tiny.TinySpec), e.g. {num_layers: 2}."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    transformer_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a fully fine-tuned transformer (save_pretrained format, e.g. a full-FT SFT run's `transformer/`) to use instead of the base one; works with `tiny` too."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom code from the model repo (text encoders/tokenizers). Off by default."},
    )
    reference_id: int = field(
        default=2, metadata={"help": "RoPE id channel-0 value of the reference tokens (target 0, draft 1)."}
    )
    reference_positions: ReferencePositions | None = field(
        default=None,
        metadata={
            "help": "RoPE row/col ids of the reference tokens: grid (own grid), none (all 0: content only), beside "
            "(right of the draft's); unset: the model's saved one, else grid."
        },
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "Embedded guidance; unset: the editor's default (Kontext 2.5, Fill 30; Qwen-Image-Edit has none "
            "and guides with true_cfg_scale)."
        },
    )
    max_sequence_length: int = field(default=512, metadata={"help": "T5 prompt length."})
    attention_backend: str = field(
        default="auto",
        metadata={"help": "Attention kernel: auto (no cuDNN on CUDA) or diffusers name."},
    )
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter (peft) instead of all transformer weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to the rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={
            "help": "Module names that get LoRA (default: attention + feed-forward, as in OmniRefiner; on "
            "Qwen-Image-Edit the FLUX feed-forward names stand for its image / text MLPs)."
        },
    )
    init_lora_path: str | None = field(
        default=None, metadata={"help": "Start from this LoRA (e.g. the SFT stage's output folder)."}
    )
    editor_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "The editor's own options as JSON, e.g. Qwen-Image-Edit's "
            '\'{"vl_condition_area": 147456, "vae_condition_area": null}\' (null: conditions at their own size); '
            "unset: the editor's defaults, or those saved with the model."
        },
    )

    def __post_init__(self):
        self.tiny_model = _as_dict(self.tiny_model, "tiny_model")
        self.editor_options = _as_dict(self.editor_options, "editor_options")
        if self.torch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"`torch_dtype` must be auto, bfloat16, float16 or float32, got {self.torch_dtype!r}")
        if self.lora_r < 1:
            raise ValueError("`lora_r` must be >= 1")
        if self.reference_positions is not None and self.reference_positions not in REFERENCE_POSITIONS:
            raise ValueError(
                f"`reference_positions` must be one of {', '.join(REFERENCE_POSITIONS)}, got {self.reference_positions!r}"
            )
        from refiner_rl.policies.attention import resolve_attention_backend

        resolve_attention_backend(self.attention_backend, "cpu")  # a ConfigError naming the known backends

    def lora_config(self):
        """The peft ``LoraConfig`` these arguments describe, or None without ``use_lora``."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else self.lora_r,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
        )

    def resolve_dtype(self, device: torch.device | str) -> torch.dtype:
        if self.torch_dtype == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return getattr(torch, self.torch_dtype)


@dataclass
class DataArguments:
    """Where the triplets come from and how they are read.

    Source:
        dataset, dataset_split, eval_dataset: a JSONL/parquet file, a folder holding ``records.jsonl``, a
            ``datasets`` name, or ``synthetic`` (the generated set of the embedded default).
    Reading:
        resolution, buckets, skip_invalid_records, alpha_background (how transparent pixels are flattened),
        dataset_num_proc (processes of the validation pass), dataset_cache_dir (where ``datasets`` keeps the
        Arrow files and the cached validation; a second start with the same files skips validation),
        reference_alignment, registration_scale_range and registration_cache (register each reference to its draft
        and warp it into the draft's frame; found registrations are kept and reused).
    Synthetic set:
        synthetic_records, synthetic_eval_records, synthetic_size, synthetic_seed, synthetic_curriculum (SFT: phases
        of geometry mixes, e.g. aligned first, then shifted and zoomed); the reference's geometry
        (synthetic_geometry and its synthetic_shift_fraction, synthetic_shift_step, synthetic_zoom_range, synthetic_warp,
        synthetic_color_jitter), synthetic_degrade, synthetic_textures, synthetic_references (several references per
        record, the detail in the last).
    """

    dataset: str = field(
        default="synthetic",
        metadata={"help": "JSONL/parquet file, folder with records.jsonl, a `datasets` name, or `synthetic`."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split for `datasets` names."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out triplets (same forms as `dataset`)."})
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Resize so images have about resolution^2 pixels (aspect kept, sides multiples of 16). None keeps sizes."
        },
    )
    buckets: list[int] | None = field(
        default=None,
        metadata={
            "help": "Resolution buckets, e.g. [512, 768, 1024]: each record goes to the nearest; batches never mix buckets."
        },
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Skip and count bad records instead of stopping with an error naming them."}
    )
    alpha_background: str = field(
        default="white",
        metadata={
            "help": "Colour transparent pixels of draft/reference/target are composited on ('white', 'black', "
            "'#808080', ...), or 'error' to reject images with transparency. Masks are always composited on black."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes that validate the records (datasets' `num_proc`); None: one."}
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache folder of `datasets` (Arrow files, cached validation); None: HF_DATASETS_CACHE."},
    )
    reference_alignment: ReferenceAlignment | None = field(
        default=None,
        metadata={
            "help": "none: the editor sees the reference as it is. register: each reference is registered to its "
            "draft (a scale and a translation found by matching the draft around the mask, the region compared "
            "after the draft's degradation) and warped into the draft's frame, so the region's detail lines up "
            "with the mask for a panned or zoomed reference; unset: the model's saved one, else none."
        },
    )
    registration_scale_range: list[float] = field(
        default_factory=lambda: [0.5, 3.0],
        metadata={"help": "[min, max] reference/draft scale that registration searches."},
    )
    registration_cache: str | None = field(
        default=None,
        metadata={"help": "Folder keeping found registrations (default ~/.cache/refiner_rl; none: off)."},
    )
    synthetic_records: int = field(
        default=512, metadata={"help": "Number of synthetic training records (dataset: synthetic)."}
    )
    synthetic_eval_records: int = field(default=32, metadata={"help": "Number of synthetic held-out records."})
    synthetic_size: int = field(default=32, metadata={"help": "Side of synthetic images in pixels."})
    synthetic_seed: int = field(
        default=1234, metadata={"help": "Seed of the synthetic set (held-out set uses seed + 1)."}
    )
    synthetic_geometry: str = field(
        default="aligned",
        metadata={
            "help": "Where the region's detail sits in the synthetic reference: aligned, shifted, zoomed, view, a "
            "comma list of them (an even mix) or name=weight pairs (e.g. 'aligned=1,zoomed=3')."
        },
    )
    synthetic_curriculum: dict | str | None = field(
        default=None,
        metadata={
            "help": "SFT curriculum over reference geometries: {geometry mix: fraction of the training steps}, in "
            "order (e.g. {aligned: 0.25, 'aligned=1,shifted=2,zoomed=2': 0.75}). The training records are split "
            "between the phases in the same fractions; replaces synthetic_geometry for training (the held-out set "
            "keeps it)."
        },
    )
    synthetic_shift_fraction: float = field(
        default=0.25, metadata={"help": "Largest pan of a `shifted` reference, as a fraction of the image side."}
    )
    synthetic_shift_step: int = field(
        default=1,
        metadata={
            "help": "A `shifted` reference pans by multiples of this many pixels (e.g. the editor's token side)."
        },
    )
    synthetic_zoom_range: list[float] = field(
        default_factory=lambda: [1.5, 2.0],
        metadata={"help": "[min, max] magnification of a `zoomed` reference (min * region side must fit the image)."},
    )
    synthetic_warp: float = field(
        default=0.08, metadata={"help": "Largest corner move of a `view` reference's perspective warp, as a fraction."}
    )
    synthetic_color_jitter: float = field(
        default=0.2, metadata={"help": "Colour change of a `view` reference: per-channel gain 1 +- j, bias +- j/2."}
    )
    synthetic_degrade: str = field(
        default="pool", metadata={"help": "How the draft's region is degraded: pool, blur, jpeg joined by '+'."}
    )
    synthetic_textures: str = field(
        default="classic",
        metadata={"help": "Detail kinds: classic (stripes, checkers, blocks, glyphs); extended adds noise, strokes."},
    )
    synthetic_references: int = field(
        default=1,
        metadata={
            "help": "References per synthetic record: the last holds the region's detail, the others are distractors "
            "(other scenes' detail); more than one is for editors that take several (Qwen-Image-Edit)."
        },
    )
    synthetic_tasks: dict | str | None = field(
        default=None,
        metadata={
            "help": "Make the synthetic set mask-guided task records for FLUX.1-Fill instead of triplets: "
            "{task: weight} over fill, extend, removal (e.g. {fill: 0.5, extend: 0.25, removal: 0.25}). Unset: triplets."
        },
    )

    def __post_init__(self):
        from refiner_rl.data.images import check_alpha_background
        from refiner_rl.errors import ConfigError, DataError

        try:
            check_alpha_background(self.alpha_background)
        except DataError as e:
            raise ConfigError(f"`alpha_background`: {e}") from e
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ConfigError(f"`dataset_num_proc` must be >= 1 or unset, got {self.dataset_num_proc}")
        self.synthetic_curriculum = _curriculum(self.synthetic_curriculum)
        try:
            self.synthetic_tasks = _as_dict(self.synthetic_tasks, "synthetic_tasks") or None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.synthetic_references < 1 or (self.synthetic_tasks and self.synthetic_references != 1):
            raise ConfigError(
                f"synthetic_references must be >= 1 (and 1 with synthetic_tasks: task records have no reference), "
                f"got {self.synthetic_references}"
            )
        if self.synthetic_tasks and self.synthetic_curriculum:
            raise ConfigError(
                "synthetic_tasks and synthetic_curriculum exclude each other (task records have no reference)"
            )
        from refiner_rl.data.records import REFERENCE_ALIGNMENTS

        if self.reference_alignment is not None and self.reference_alignment not in REFERENCE_ALIGNMENTS:
            raise ConfigError(
                f"`reference_alignment` must be one of {', '.join(REFERENCE_ALIGNMENTS)}, got {self.reference_alignment!r}"
            )
        lo, hi = (list(self.registration_scale_range) + [0, 0])[:2]
        if len(self.registration_scale_range) != 2 or not 0 < lo <= hi:
            raise ConfigError(
                f"`registration_scale_range` must be [min, max] with 0 < min <= max, got {self.registration_scale_range}"
            )

    def build(self, *, multiple: int, eval: bool = False):
        """The training (or held-out) :class:`TripletDataset`; ``None`` when no held-out set is asked for."""
        from refiner_rl.data import TripletDataset

        source, phases = self.records(eval=eval)
        if source is None:
            return None
        ds = TripletDataset(
            source,
            resolution=self.resolution,
            buckets=self.buckets,
            multiple=multiple,
            skip_invalid=self.skip_invalid_records,
            alpha_background=self.alpha_background,
            num_proc=self.dataset_num_proc,
            reference_alignment=self.reference_alignment or "none",  # unset: the default
            registration={"scale_range": tuple(self.registration_scale_range)},
        )
        if ds.reference_alignment == "register":
            ds.register_references(cache_dir=self.registration_cache_dir())
        if phases:
            ds.curriculum = phases  # (first record, end, fraction of the steps) per phase; the SFT sampler reads it
        return ds

    def registration_cache_dir(self) -> str | None:
        """Where found registrations are kept (``registration_cache``); None for ``none``."""
        from refiner_rl.data.registration import default_cache_dir

        if self.registration_cache is None:
            return default_cache_dir()
        return None if self.registration_cache.lower() == "none" else self.registration_cache

    def records(self, *, eval: bool = False):
        """``(records, phases)`` that :meth:`build` reads: the synthetic set's records (PIL images, before any
        registration) or the dataset's loaded records; ``phases`` of a synthetic curriculum, else None. ``(None,
        None)`` when no held-out set is asked for."""
        from refiner_rl.data import load_records, mask_task_records, synthetic_records

        source = self.eval_dataset if eval else self.dataset
        if source is None:
            if self.dataset != "synthetic":
                return None, None
            source = "synthetic"
        phases = None
        if source == "synthetic":
            options = dict(
                size=self.synthetic_size,
                shift_fraction=self.synthetic_shift_fraction,
                shift_step=self.synthetic_shift_step,
                zoom_range=tuple(self.synthetic_zoom_range),
                warp=self.synthetic_warp,
                color_jitter=self.synthetic_color_jitter,
                degrade=self.synthetic_degrade,
                textures=self.synthetic_textures,
            )
            if self.synthetic_references != 1:
                options["num_references"] = self.synthetic_references
            if self.synthetic_tasks:
                n = self.synthetic_eval_records if eval else self.synthetic_records
                seed = self.synthetic_seed + (1 if eval else 0)
                source = mask_task_records(n, seed=seed, tasks=self.synthetic_tasks, **options)
            elif eval or not self.synthetic_curriculum:
                n = self.synthetic_eval_records if eval else self.synthetic_records
                seed = self.synthetic_seed + (1 if eval else 0)
                source = synthetic_records(n, seed=seed, geometry=self.synthetic_geometry, **options)
            else:  # phase k: its share of the records, drawn with seed + 1000 k
                source, phases = [], []
                for k, (geometry, fraction) in enumerate(self.synthetic_curriculum.items()):
                    n = max(1, round(self.synthetic_records * fraction))
                    phases.append((len(source), len(source) + n, fraction))
                    source += synthetic_records(n, seed=self.synthetic_seed + 1000 * k, geometry=geometry, **options)
        else:
            source = load_records(source, split=self.dataset_split, cache_dir=self.dataset_cache_dir)
        return source, phases


def _curriculum(value) -> dict[str, float] | None:
    """``synthetic_curriculum`` as {geometry mix: fraction of the steps}, fractions summing to 1; None when unset."""
    from refiner_rl.data.synthetic import parse_geometry
    from refiner_rl.errors import ConfigError

    try:
        phases = _as_dict(value, "synthetic_curriculum")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not phases:
        return None
    for geometry, fraction in phases.items():
        parse_geometry(geometry)
        if not isinstance(fraction, (int, float)) or not fraction > 0:
            raise ConfigError(
                f"synthetic_curriculum: the fraction of phase {geometry!r} must be a number > 0, got {fraction!r}"
            )
    total = sum(phases.values())
    return {g: f / total for g, f in phases.items()}


def build_policy(model_args: ModelArguments, device: torch.device | str = "cpu"):
    """The editor described by ``model_args`` (its class picked by :func:`refiner_rl.policies.policy_class`), with
    its LoRA attached (or loaded) when asked."""
    from refiner_rl.errors import ConfigError
    from refiner_rl.policies import policy_class
    from refiner_rl.policies.attention import set_attention_backend
    from refiner_rl.policies.base import TINY_EDITORS

    dtype = model_args.resolve_dtype(device)
    name = model_args.model_name_or_path
    cls = policy_class(name, model_args.revision)
    options = {"reference_id": model_args.reference_id, "reference_positions": model_args.reference_positions or "grid"}
    options = {k: v for k, v in options.items() if k in cls.option_names()}  # unset: the default
    unknown = sorted(set(model_args.editor_options) - set(cls.option_names()))
    if unknown:
        raise ConfigError(
            f"editor_options {unknown} are not options of {cls.__name__}; its options: "
            f"{', '.join(cls.option_names()) or 'none'}"
        )
    options.update(model_args.editor_options)
    if name in TINY_EDITORS:
        tiny = {**model_args.tiny_model, **options}
        policy = cls.tiny(dtype=dtype, guidance_scale=model_args.guidance_scale, **tiny)
        if model_args.transformer_path:
            policy.load_transformer(model_args.transformer_path)
        if dtype != torch.float32:
            policy.transformer.to(dtype)
    else:
        policy = cls.from_pretrained(
            name,
            dtype=dtype,
            revision=model_args.revision,
            trust_remote_code=model_args.trust_remote_code,
            transformer_path=model_args.transformer_path,
            max_sequence_length=model_args.max_sequence_length,
            guidance_scale=model_args.guidance_scale,
            **options,
        )
    if model_args.use_lora:
        policy.add_lora(model_args.lora_config())
        if model_args.init_lora_path:
            policy.load_lora(model_args.init_lora_path)
    elif model_args.init_lora_path:
        raise ValueError(
            "`init_lora_path` needs `use_lora: true` (the adapter is loaded into a LoRA of the same shape)"
        )
    set_attention_backend(policy.transformer, model_args.attention_backend, device)
    # saved with a trained model (refiner_rl_model.json), so `refiner-rl refine` rebuilds what its weights sit on
    transformer_path = model_args.transformer_path
    policy.base_model = {
        "model_name_or_path": name,
        "revision": model_args.revision,
        "transformer_path": os.path.abspath(transformer_path) if transformer_path else None,
        "tiny_model": dict(model_args.tiny_model) if name in TINY_EDITORS else {},
    }
    return policy.to(device)


def resolve_policy(model, args, peft_config=None):
    """The trainers' ``model`` argument as a policy: an :class:`EditorPolicy` as given, or a tiny name / a diffusers
    repo id / a local folder loaded (no LoRA, on ``args``' device); ``peft_config`` (a peft ``LoraConfig``) is
    then attached to its transformer."""
    from refiner_rl.errors import ConfigError
    from refiner_rl.policies import EditorPolicy

    if isinstance(model, str):
        device = "cpu" if getattr(args, "use_cpu", False) else args.device
        policy = build_policy(ModelArguments(model_name_or_path=model, use_lora=False), device)
    elif isinstance(model, EditorPolicy):
        policy = model
    else:
        raise ConfigError(
            "`model` must be an editor policy (refiner_rl.policies), a tiny name (tiny, tiny-kontext, "
            f"tiny-fill), a diffusers repo id or a local folder, got {type(model).__name__}"
        )
    if peft_config is not None:
        if policy.has_lora:
            raise ConfigError("`peft_config` given for a policy that already has a LoRA adapter: pass one or the other")
        policy.add_lora(peft_config)
        policy.transformer.to(policy.device)  # the new adapter's weights join the transformer's device
    return policy
