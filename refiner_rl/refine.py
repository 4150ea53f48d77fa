"""Apply a trained refiner exactly as it was trained: the one path of ``refiner-rl refine``, :class:`RefinerPipeline`
and ``refiner-rl edit --mask``.

A trained output folder carries ``refiner_rl_model.json`` (:mod:`refiner_rl.model_settings`): the base model its
weights sit on, the editor kind, reference registration and positions, guidance, and the sampler its run evaluated
with (steps, start sigma, true CFG, paste-back, region focus). :func:`load_refiner` reads them; any of them can be
forced (a forced serving setting is logged with the value the model was trained with).

Records are served through :class:`~refiner_rl.data.TripletDataset` (the decoding, resizing and reference
registration of training and ``eval``) and sampled by :func:`refiner_rl.evaluation.loop.sample_batch` (``eval``'s
sampler: record ``i``'s noise is ``keyed_generator(seed, i)``), so ``refine`` of held-out records reproduces
``eval``'s numbers for the same seed. Records need no target; one is used for the in-mask error when present.
Records are checked one at a time as they are reached (:func:`check_record`), so a bad record stops the run after the
records before it were written, or is skipped and counted (``skip_invalid``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from refiner_rl.errors import ConfigError, DataError
from refiner_rl.evaluation.loop import SamplerSettings, sample_batch

logger = logging.getLogger(__name__)

# sampler flag -> default when neither the flag nor the model's saved sampler sets it
SAMPLER_DEFAULTS = {"num_inference_steps": 10, "start_sigma": 1.0, "true_cfg_scale": 1.0, "paste_back": False}


@dataclass
class Refiner:
    """A loaded refiner: the frozen editor policy (with its serving settings as attributes: ``reference_alignment``,
    ``reference_registration``), the sampler, and what was served (``served``: for logs and ``refined.json``)."""

    policy: object
    sampler: SamplerSettings
    model: str
    served: dict = field(default_factory=dict)

    @property
    def reference_alignment(self) -> str:
        return getattr(self.policy, "reference_alignment", "none")

    @property
    def registration(self) -> dict:
        return dict(getattr(self.policy, "reference_registration", None) or {})


def sampler_settings(saved: dict, *, seed: int | None = None, negative_prompt: str = "", focus_crop=None, **explicit):
    """The :class:`SamplerSettings` of a model: each of :data:`SAMPLER_DEFAULTS` from ``explicit`` (None = unset),
    else the model's ``saved`` sampler, else the default; region focus as saved unless ``focus_crop`` is given; the
    noise seed given, else the saved one (the seed a model's reported figures were measured with), else 0."""
    from refiner_rl.focus import FocusSettings

    unknown = sorted(set(explicit) - set(SAMPLER_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown sampler setting(s) {unknown}")
    values = {}
    for key, default in SAMPLER_DEFAULTS.items():
        value = explicit.get(key)
        values[key] = value if value is not None else saved.get(key, default)
    focus = saved.get("focus")
    if focus_crop is not None:
        focus = (focus or {}) if focus_crop else None
    if int(values["num_inference_steps"]) < 1 or not 0 < float(values["start_sigma"]) <= 1:
        raise ConfigError(
            f"num_inference_steps must be >= 1 and start_sigma in (0, 1], got {values['num_inference_steps']} and "
            f"{values['start_sigma']}"
        )
    sampler = SamplerSettings(
        num_steps=int(values["num_inference_steps"]),
        seed=int(seed if seed is not None else saved.get("seed", 0)),
        start_sigma=float(values["start_sigma"]),
        paste=bool(values["paste_back"]),
        true_cfg_scale=float(values["true_cfg_scale"]),
        negative_prompt=negative_prompt,
        focus=FocusSettings(**focus) if focus is not None else None,
    )
    return sampler, {**values, "focus": focus}


def load_refiner(
    model: str,
    *,
    device=None,
    torch_dtype: str = "auto",
    base_model: str | None = None,
    transformer_path: str | None = None,
    tiny_model: dict | None = None,
    revision: str | None = None,
    reference_alignment: str | None = None,
    reference_positions: str | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    start_sigma: float | None = None,
    true_cfg_scale: float | None = None,
    paste_back: bool | None = None,
    focus_crop: bool | None = None,
    negative_prompt: str = "",
    seed: int | None = None,
) -> Refiner:
    """The refiner trained into ``model`` (a refiner-rl output or checkpoint folder: LoRA or full fine-tune; or a
    base editor), served as it was trained; every argument left None takes the model's saved value."""
    from refiner_rl.agents.editor import load_editor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_editor(
        model,
        base=base_model,
        device=device,
        torch_dtype=torch_dtype,
        reference_alignment=reference_alignment,
        reference_positions=reference_positions,
        strict=False,
        transformer_path=transformer_path,
        tiny_model=tiny_model,
        revision=revision,
        guidance_scale=guidance_scale,
    )
    explicit = dict(num_inference_steps=num_inference_steps, start_sigma=start_sigma, true_cfg_scale=true_cfg_scale)
    sampler, values = sampler_settings(
        policy.saved_sampler,
        seed=seed,
        negative_prompt=negative_prompt,
        focus_crop=focus_crop,
        paste_back=paste_back,
        **explicit,
    )
    served = {
        "kind": policy.kind,
        "base_model": (policy.base_model or {}).get("model_name_or_path"),
        "lora": bool(policy.has_lora),
        "reference_alignment": policy.reference_alignment,
        **policy.options(),
        "guidance_scale": policy.guidance_scale,
        **values,
        "seed": sampler.seed,
    }
    logger.info("refining with %s", ", ".join(f"{k} {v}" for k, v in served.items()))
    return Refiner(policy, sampler, model, served)


def refine_dataset(refiner: Refiner, records, *, base_dir: str | None = None, resolution: int | None = None, **kwargs):
    """``records`` (a file, folder, ``datasets`` dataset or list of dicts; see :func:`refiner_rl.data.load_records`)
    as the :class:`TripletDataset` the refiner is served: its size multiple, its reference alignment and registration.
    Records are checked one at a time as they are refined (:func:`check_record`), not up front."""
    from refiner_rl.data import TripletDataset

    options = {"reference_alignment": refiner.reference_alignment, "registration": refiner.registration or None}
    options.update(kwargs)
    return TripletDataset(
        records, base_dir, resolution=resolution, multiple=refiner.policy.size_multiple, validate=False, **options
    )


def check_record(dataset, index: int) -> dict:
    """Record ``index`` of ``dataset`` checked as training data is (every image readable, the mask not empty, draft,
    mask and target of one size) except that it needs no target; a :class:`RecordError` naming the record and field.
    Returns the raw record."""
    from refiner_rl.data.images import header_size
    from refiner_rl.data.validation import RecordError, record_name
    from refiner_rl.data.validation import check_record as check_training_record

    record = dataset.record(index)
    name = record_name(record, index)
    if record.get("task") not in (None, ""):
        raise RecordError(
            f"{name}: a mask-guided task record (task {record['task']!r}); refine takes draft + reference"
        )
    for key in ("prompt", "draft", "reference"):
        if record.get(key) in (None, ""):
            raise RecordError(f"{name}: missing field {key!r}")
    if record.get("mask") not in (None, ""):
        where = {k: f"{name}, field {k!r}" for k in ("draft", "mask")}
        size = {k: header_size(record[k], base_dir=dataset.base_dir, where=where[k]) for k in ("draft", "mask")}
        if size["mask"] != size["draft"]:
            (mw, mh), (dw, dh) = size["mask"], size["draft"]
            raise RecordError(f"{name}: size mismatch: 'mask' is {mw}x{mh} but 'draft' is {dw}x{dh} (they must match)")
    filled = record if record.get("target") not in (None, "") else {**record, "target": record["draft"]}
    check_training_record(filled, index, dataset.base_dir, dataset.alpha_background)
    return record


def refine_batches(
    refiner: Refiner,
    dataset,
    indices: Sequence[int],
    *,
    batch_size: int = 1,
    skip_invalid: bool = False,
    skipped: list | None = None,
    generators: dict | None = None,
) -> Iterator[tuple[dict, torch.Tensor]]:
    """``(batch, refined images [B, 3, H, W] on the CPU)`` for ``indices`` in order, ``batch_size`` records of one
    size at a time. Each record is checked and decoded (references registered when the model was trained so) when
    reached: a bad one raises its :class:`RecordError`, or with ``skip_invalid`` is left out and its message appended
    to ``skipped``. Record ``i``'s noise: ``keyed_generator(seed, i)`` as ``eval``'s, or ``generators[i]``."""
    from refiner_rl.data import collate_triplets
    from refiner_rl.data.validation import RecordError

    pending: list[dict] = []

    def flush():
        batch = collate_triplets(pending)
        pending.clear()
        gens = [generators[int(i)] for i in batch["index"]] if generators is not None else None
        return batch, sample_batch(refiner.policy, batch, refiner.sampler, generators=gens)

    for i in indices:
        try:
            check_record(dataset, i)
            item = dataset[i]
        except DataError as e:
            if not skip_invalid:
                if pending:  # the records before it are refined (and written by the caller) first
                    yield flush()
                raise RecordError(f"{e}; --skip_invalid_records skips and counts bad records") from e
            logger.warning("skipped: %s", e)
            if skipped is not None:
                skipped.append(str(e))
            continue
        shape = (tuple(item["draft"].shape), tuple(item["reference"].shape), "target" in item)  # one batch: one kind
        if pending and shape != pending[0]["_shape"]:
            yield flush()
        pending.append({**item, "_shape": shape})
        if len(pending) >= batch_size:
            yield flush()
    if pending:
        yield flush()


def whole_image(batch: dict) -> bool:
    """Whether every record of ``batch`` has an all-ones mask (no mask given: the whole image is refined)."""
    return bool((batch["mask"] >= 0.5).all())
