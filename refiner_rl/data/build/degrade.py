"""Stage 3, degrade: the target's region -> the draft, through composable operators recorded per record.

``degrade`` lists operators applied in order, each ``name``, ``name:value`` or ``name:min-max`` (the value drawn
per record, uniformly; integers for ``downsample`` and ``jpeg``); with ``degrade_pick: k`` each record applies k
of them, drawn at random and kept in order. Every operator but ``vae`` changes the region only:
``draft = M * op(draft) + (1 - M) * draft`` with ``M`` the mask, so the draft stays right outside it.

- ``downsample:f``: box-filter down by ``f``, bicubic back up (what a low-resolution pass loses);
- ``blur:r``: Gaussian blur of radius ``r`` pixels;
- ``jpeg:q``: JPEG round trip at quality ``q``;
- ``noise:s``: additive Gaussian noise of standard deviation ``s`` (pixel values in [0, 1]);
- ``vae``: the editor's own codec round trip of the whole image, ``decode(encode(x))``, as every edit through the
  editor suffers (lossless for the tiny editor's pixel codec);
- ``regenerate:s``: the base editor (``editor``) re-draws the region: the draft is noised to sigma ``s`` and
  sampled back with ``regenerate_steps`` ODE steps, given the reference and ``regenerate_prompt``, then pasted into
  the mask. This is how real drafts look: plausible, wrong detail.

The editor behind ``vae`` and ``regenerate`` is given by the caller (:class:`~refiner_rl.data.build.common.StageContext`'s
``editor``, e.g. ``refiner-rl data build``'s :class:`refiner_rl.cli.data.BuildEditor`): an object with
``vae(drafts)`` and ``regenerate(drafts, references, masks, steps)`` over PIL images, built once per stage run.

Each record's ``degradations`` is the JSON list of what was applied, e.g. ``[{"op": "downsample", "factor": 3}]``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageFilter

from refiner_rl.data.build.common import (
    DROP,
    StageContext,
    from_array,
    from_png,
    kept,
    record_rng,
    to_array,
    to_png,
)
from refiner_rl.errors import ConfigError

# name -> (parameter, default, lowest, highest, integer)
OPERATORS = {
    "downsample": ("factor", 4, 1, 64, True),
    "blur": ("radius", 1.5, 0.0, 64.0, False),
    "jpeg": ("quality", 30, 1, 100, True),
    "noise": ("std", 0.03, 0.0, 1.0, False),
    "vae": (None, None, None, None, False),
    "regenerate": ("strength", 0.7, 0.0, 1.0, False),
}
EDITOR_OPERATORS = ("vae", "regenerate")


@dataclass(frozen=True)
class Operator:
    name: str
    lo: float | None = None
    hi: float | None = None

    @property
    def needs_editor(self) -> bool:
        return self.name in EDITOR_OPERATORS

    def draw(self, rng: np.random.Generator) -> dict:
        """This record's parameters: ``{"op": name, param: value}``."""
        param, _, _, _, integer = OPERATORS[self.name]
        if param is None:
            return {"op": self.name}
        value = int(rng.integers(self.lo, self.hi + 1)) if integer else round(float(rng.uniform(self.lo, self.hi)), 4)
        return {"op": self.name, param: value}


def parse_operators(specs: list[str]) -> list[Operator]:
    """``["downsample:2-4", "jpeg:30", "vae"]`` -> operators; a :class:`ConfigError` naming the bad entry."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ConfigError("`degrade` is empty: give at least one operator, e.g. ['downsample:2-4']")
    ops = []
    for spec in specs:
        name, _, value = str(spec).strip().partition(":")
        if name not in OPERATORS:
            raise ConfigError(f"`degrade` entry {spec!r}: unknown operator {name!r}; known: {', '.join(OPERATORS)}")
        param, default, lowest, highest, integer = OPERATORS[name]
        if param is None:
            if value:
                raise ConfigError(f"`degrade` entry {spec!r}: {name} takes no value")
            ops.append(Operator(name))
            continue
        try:
            lo, _, hi = value.partition("-") if value else (str(default), "", "")
            lo, hi = float(lo), float(hi or lo)
        except ValueError:
            raise ConfigError(f"`degrade` entry {spec!r}: use {name}, {name}:VALUE or {name}:MIN-MAX") from None
        if not lowest <= lo <= hi <= highest or (integer and (lo != int(lo) or hi != int(hi))):
            kind = "integers" if integer else "numbers"
            raise ConfigError(
                f"`degrade` entry {spec!r}: {param} must be {kind} with {lowest} <= min <= max <= {highest}"
            )
        ops.append(Operator(name, lo, hi))
    return ops


def apply_image_op(img: Image.Image, step: dict, rng: np.random.Generator) -> Image.Image:
    """One pixel operator (not ``vae``/``regenerate``) on a whole RGB image."""
    op = step["op"]
    if op == "downsample":
        w, h = img.size
        f = step["factor"]
        return img.resize((max(1, w // f), max(1, h // f)), Image.BOX).resize((w, h), Image.BICUBIC)
    if op == "blur":
        return img.filter(ImageFilter.GaussianBlur(step["radius"]))
    if op == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=step["quality"])
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if op == "noise":
        arr = to_array(img)
        return from_array(arr + rng.normal(0.0, step["std"], arr.shape).astype(np.float32))
    raise ValueError(f"not a pixel operator: {op}")


def paste(degraded: Image.Image, draft: Image.Image, mask: Image.Image) -> Image.Image:
    """``M * degraded + (1 - M) * draft`` (the mask is binary)."""
    return Image.composite(degraded, draft, mask.point(lambda v: 255 if v >= 128 else 0))


def _plan(rid: str, ops: list[Operator], config) -> tuple[list[dict], np.random.Generator]:
    rng = record_rng(config.seed, "degrade", rid)
    chosen = ops
    if config.degrade_pick is not None:
        chosen = [ops[i] for i in sorted(rng.choice(len(ops), config.degrade_pick, replace=False))]
    steps = [op.draw(rng) for op in chosen]
    for st in steps:
        if st["op"] == "regenerate":
            st["seed"] = int(rng.integers(2**31))
    return steps, rng


def _degrade_batch(batch: dict, *, config, editor) -> dict:
    ops = parse_operators(config.degrade)
    n = len(batch["id"])
    plans = [_plan(batch["id"][i], ops, config) for i in range(n)]
    drafts = [from_png(b) for b in batch["target"]]
    masks = [from_png(b, mask=True) for b in batch["mask"]]
    for j in range(max(len(p[0]) for p in plans)):
        editor_rows: dict[tuple, list[int]] = {}
        for i, (steps, rng) in enumerate(plans):
            if j >= len(steps):
                continue
            if steps[j]["op"] in EDITOR_OPERATORS:
                ref_size = from_png(batch["reference"][i]).size if steps[j]["op"] == "regenerate" else None
                editor_rows.setdefault((steps[j]["op"], drafts[i].size, ref_size), []).append(i)
            else:
                drafts[i] = paste(apply_image_op(drafts[i], steps[j], rng), drafts[i], masks[i])
        for (op, _, _), rows in editor_rows.items():  # one editor call per operator and image size
            for start in range(0, len(rows), config.batch_size):
                part = rows[start : start + config.batch_size]
                if op == "vae":
                    new = editor.vae([drafts[i] for i in part])
                else:
                    refs = [from_png(batch["reference"][i]) for i in part]
                    new = editor.regenerate(
                        [drafts[i] for i in part], refs, [masks[i] for i in part], [plans[i][0][j] for i in part]
                    )
                for i, img in zip(part, new):
                    drafts[i] = img
    out = {k: list(v) for k, v in batch.items()}
    out["draft"] = [to_png(d) for d in drafts]
    out["degradations"] = [json.dumps(p[0]) for p in plans]
    for k, v in kept().items():
        out[k] = [v] * n
    return out


def degrade(ds: datasets.Dataset, config, ctx: StageContext) -> datasets.Dataset:
    """Stage 3 (module docstring): adds ``draft`` and ``degradations`` to every record. Editor operators run in
    this process (one model, batched calls); pixel-only chains use ``num_proc`` processes."""
    ops = parse_operators(config.degrade)
    editor = None
    if any(op.needs_editor for op in ops):
        if ctx.editor is None:
            raise ConfigError(
                f"`degrade` {config.degrade!r} uses {' or '.join(EDITOR_OPERATORS)}, which need an editor: build with "
                "`refiner-rl data build`, or pass build_dataset(config, editor=...)"
            )
        editor = ctx.editor()
    features = datasets.Features(
        {**ds.features, "draft": datasets.Value("binary"), "degradations": datasets.Value("string"), **DROP}
    )
    return ctx.map(
        ds,
        _degrade_batch,
        step="degrade",
        num_proc=None if editor else config.num_proc,
        batched=True,
        batch_size=max(config.batch_size, 8),
        fn_kwargs={"config": config, "editor": editor},
        features=features,
    )
