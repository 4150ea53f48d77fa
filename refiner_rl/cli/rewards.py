"""``refiner-rl rewards``: list the reward plug-ins, or score a folder of images with a recipe's rewards.

    refiner-rl rewards list [--json]
    refiner-rl rewards score --config recipe.yaml --images DIR [--data records.jsonl] [--json]

``score`` reads the recipe's ``rewards:`` list (the same specs training uses; other keys are ignored) and
scores every image file in ``--images`` (png, jpg, jpeg, webp, bmp, tif, tiff; sorted by name, not
recursive). ``--data`` gives each image its record: a JSONL with ``prompt`` and image paths ``draft``,
``reference``, ``target``, ``mask`` relative to the JSONL's folder (or absolute). Matching rule: a record
belongs to the image whose file name (or path relative to ``--images``) equals its ``image`` key; a record
without ``image`` belongs to the image whose name without extension equals its ``id``. Every image must
match exactly one record; records matching no image are ignored (and counted on stderr). Without
``--data`` only rewards that need no record field can run.

Rewards are built and called as in training (:func:`refiner_rl.scoring.build_reward_funcs`, then
:func:`refiner_rl.scoring.score_batch` per ``--batch-size`` images): registered names, dotted paths to reward
classes or plain TRL reward functions. Weights are the recipe's: each entry's ``weight:`` or a top-level
``reward_weights:`` list (not both), 1 by default.

Output: a table with one row per image, one column per reward and the weighted total (NaN-aware: a reward that
did not score an image adds nothing, and an image no reward scored has no total, as in training), or with
``--json`` an object ``{"rewards": [...], "rows": [...], "errors": {...}}``. A reward that fails prints its
error on stderr and shows ``-`` (``null`` in JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any

from refiner_rl.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RECORD_IMAGE_FIELDS = {"draft": "RGB", "reference": "RGB", "target": "RGB", "mask": "L"}


class CliError(UserError):
    """A user error: printed without a traceback, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refiner-rl rewards", description="List reward plug-ins or score images with a recipe's rewards."
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every registered reward (built-in and entry point)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sc = sub.add_parser("score", help="score a folder of images with the rewards of a recipe")
    sc.add_argument("--config", required=True, help="recipe YAML with a `rewards:` list")
    sc.add_argument("--images", required=True, help="folder of sample images to score")
    sc.add_argument(
        "--data",
        default=None,
        help="JSONL of records (prompt, draft, reference, target, mask) matched to the images",
    )
    sc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sc.add_argument("--device", default=None, help="device for reward models (default: each reward's own, cpu)")
    sc.add_argument("--batch-size", type=int, default=8, help="images per reward call (default 8)")
    return p


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage / error
        return int(e.code or 0)
    try:
        return _list(args) if args.command == "list" else _score(args)
    except CliError as e:
        print(f"refiner-rl rewards: error: {e}", file=sys.stderr)
        return 2


# -- list ---------------------------------------------------------------------------------------------


def _describe(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _list(args: argparse.Namespace) -> int:
    from refiner_rl.scoring import registry

    rows = []
    for name, cls in registry.available_rewards().items():
        rows.append(
            {
                "name": name,
                "required_fields": list(cls.required_fields),
                "optional_fields": list(getattr(cls, "optional_fields", ())),
                "provides_maps": bool(cls.provides_maps),
                "source": registry.reward_source(name),
                "class": f"{cls.__module__}:{cls.__qualname__}",
                "description": _describe(cls),
            }
        )
    if args.json:
        print(json.dumps({"rewards": rows, "load_errors": registry.load_errors()}, indent=2))
    else:
        table = [["name", "required", "optional", "maps", "source", "description"]]
        table += [
            [
                r["name"],
                ",".join(r["required_fields"]) or "-",
                ",".join(r["optional_fields"]) or "-",
                "yes" if r["provides_maps"] else "-",
                r["source"],
                r["description"],
            ]
            for r in rows
        ]
        print(_format_table(table))
    for where, err in registry.load_errors().items():
        print(f"warning: could not load {where}: {err}", file=sys.stderr)
    return 0


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- score --------------------------------------------------------------------------------------------


def _load_recipe_rewards(path: str) -> tuple[list, list[float]]:
    """The recipe's reward specs (without ``weight``) and one weight per reward."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except OSError as e:
        raise CliError(f"cannot read recipe {path}: {e}") from e
    except yaml.YAMLError as e:
        raise CliError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(recipe, dict) or "rewards" not in recipe:
        raise CliError(
            f"recipe {path} has no top-level `rewards:` list (e.g. rewards: [{{name: masked_pixel, weight: 1.0}}])"
        )
    specs = recipe["rewards"]
    if not isinstance(specs, list) or not specs:
        raise CliError(
            f"recipe {path}: `rewards` must be a non-empty list of specs like {{name: masked_pixel, weight: 1.0}}"
        )
    from refiner_rl.scoring.registry import RewardConfigError, split_weights

    try:
        specs, weights = split_weights(specs)
    except RewardConfigError as e:
        raise CliError(f"recipe {path}: {e}") from e
    listed = recipe.get("reward_weights")
    if listed is not None:
        if weights is not None:
            raise CliError(f"recipe {path}: give weights either per entry (`weight:`) or as `reward_weights`, not both")
        if not isinstance(listed, list) or len(listed) != len(specs):
            raise CliError(f"recipe {path}: `reward_weights` must be a list of {len(specs)} numbers, one per reward")
        weights = [float(w) for w in listed]
    return specs, weights or [1.0] * len(specs)


def _open_image(path: str, mode: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError as e:
        raise CliError(f"{what}: file not found: {path}") from e
    except Exception as e:
        raise CliError(f"{what}: cannot read image {path} ({type(e).__name__}: {e})") from e


def _image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise CliError(f"--images {folder}: not a folder")
    names = sorted(
        n
        for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
    )
    if not names:
        raise CliError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return names


def _match_records(data_path: str, images: list[str], images_dir: str) -> tuple[list[dict], int]:
    """Records in image order (see the module docstring for the rule) and how many matched no image."""
    records = []
    try:
        with open(data_path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise CliError(f"--data {data_path}: line {lineno} is not JSON ({e})") from e
    except OSError as e:
        raise CliError(f"cannot read --data {data_path}: {e}") from e
    by_image: dict[str, tuple[int, dict]] = {}
    stems = {os.path.splitext(n)[0]: n for n in images}
    unmatched = 0
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise CliError(f"--data {data_path}: line {lineno} is not a JSON object")
        if rec.get("image") is not None:
            key = os.path.normpath(str(rec["image"]))
            if os.path.isabs(key):
                key = os.path.relpath(key, os.path.abspath(images_dir))
            name = key if key in images else None
        elif rec.get("id") is not None:
            name = stems.get(str(rec["id"]))
        else:
            raise CliError(f"--data {data_path}: line {lineno} has neither `image` nor `id` to match an image file")
        if name is None:
            unmatched += 1
            continue
        if name in by_image:
            raise CliError(f"--data {data_path}: lines {by_image[name][0]} and {lineno} both match image {name}")
        by_image[name] = (lineno, rec)
    missing = [n for n in images if n not in by_image]
    if missing:
        raise CliError(
            f"--data {data_path}: no record for image(s) {', '.join(missing)} (a record matches by `image` = file name, "
            "or by `id` = file name without extension)"
        )
    return [by_image[n][1] for n in images], unmatched


def _columns(records: list[dict], data_path: str) -> dict[str, list[Any]]:
    """The records as columns (``None`` where a record lacks the field): image fields as tensors, every other
    field (except ``prompt``) as it is in the JSONL, so reward functions see every column."""
    from refiner_rl.scoring.base import as_image_tensor

    base = os.path.dirname(os.path.abspath(data_path))
    columns: dict[str, list[Any]] = {}
    for field, mode in RECORD_IMAGE_FIELDS.items():
        if not any(rec.get(field) for rec in records):
            continue
        values = []
        for rec in records:
            if not rec.get(field):
                values.append(None)
                continue
            path = rec[field] if os.path.isabs(rec[field]) else os.path.join(base, rec[field])
            img = _open_image(path, mode, f"record {rec.get('id', rec.get('image'))!r} field {field!r}")
            values.append(as_image_tensor(img, channels=1 if mode == "L" else 3))
        columns[field] = values
    for field in dict.fromkeys(k for rec in records for k in rec):
        if field not in RECORD_IMAGE_FIELDS and field != "prompt":
            columns[field] = [rec.get(field) for rec in records]
    return columns


def _score(args: argparse.Namespace) -> int:
    import torch

    from refiner_rl.scoring import aggregate, registry
    from refiner_rl.scoring.base import as_image_tensor
    from refiner_rl.scoring.batch import score_batch

    specs, weights = _load_recipe_rewards(args.config)
    names = _image_files(args.images)
    columns: dict[str, list[Any]] = {}
    prompts = [""] * len(names)
    if args.data:
        records, unmatched = _match_records(args.data, names, args.images)
        if unmatched:
            print(f"note: {unmatched} record(s) in {args.data} match no image in {args.images}", file=sys.stderr)
        columns = _columns(records, args.data)
        prompts = [str(r.get("prompt", "")) for r in records]
    try:
        rewards = registry.build_reward_funcs(specs, device=args.device)
        # a field counts as available when every record has it (a reward needing it would fail otherwise)
        registry.check_required_fields(rewards, [f for f, v in columns.items() if all(x is not None for x in v)])
    except registry.RewardConfigError as e:
        hint = "" if args.data else " (pass --data records.jsonl to provide record fields)"
        raise CliError(f"{args.config}: {e}{hint}") from e
    except OSError as e:
        raise CliError(f"{args.config}: {e}") from e
    images = [as_image_tensor(_open_image(os.path.join(args.images, n), "RGB", "--images")) for n in names]

    labels = registry.reward_labels(rewards)
    parts, errors = [], {}
    step = max(1, args.batch_size)
    for s in range(0, len(names), step):
        cols = {f: v[s : s + step] for f, v in columns.items()}
        batch = score_batch(rewards, prompts[s : s + step], images[s : s + step], cols)
        parts.append(batch.scores)
        for label, err in batch.errors.items():
            errors.setdefault(label, err)
    matrix = torch.cat(parts)
    total, valid = aggregate.weighted_total(matrix, torch.tensor(weights))
    values = [[None if math.isnan(v) else v for v in row] for row in matrix.double().tolist()]
    totals = [float(t) if bool(ok) else None for t, ok in zip(total, valid)]

    for label, err in errors.items():
        print(f"reward {label!r} failed: {err}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "rewards": [
                        {"label": lab, "name": r.name, "weight": w} for lab, r, w in zip(labels, rewards, weights)
                    ],
                    "rows": [
                        {"image": n, "scores": dict(zip(labels, row)), "total": t}
                        for n, row, t in zip(names, values, totals)
                    ],
                    "errors": errors,
                },
                indent=2,
            )
        )
    else:
        table = [["image", *[f"{lab} (x{w:g})" for lab, w in zip(labels, weights)], "total"]]
        table += [[n, *[_fmt(v) for v in row], _fmt(t)] for n, row, t in zip(names, values, totals)]
        print(_format_table(table))
    return 0


def _fmt(value: float | None) -> str:
    """Four decimals, ``-`` for no score; never ``-0.0000`` (a value that rounds to zero prints ``0.0000``)."""
    if value is None:
        return "-"
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text
