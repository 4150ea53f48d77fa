"""A small synthetic decomposition set: coloured-shape images and compound instructions with their triples.

Each record joins one to three clauses ("make the square red", "remove the circle", "add a star in the
corner") into one instruction and keeps the clauses' triples as ground truth. Used by the tiny recipe and the
tests; ``write_synthetic_decompositions`` writes PNGs and a ``records.jsonl`` with relative paths, the layout
users give.

A triple's *combination* is its (action, subject, goal). :func:`heldout_combinations` draws a seeded share of the
49 possible ones, and :func:`split_by_combination` keeps the records without any of them for training and the
records with at least one for evaluation: a held-out instruction asks for an edit whose combination of action,
subject and goal never appears in training, though each of its words does.
"""

from __future__ import annotations

import json
import os
import random

SHAPES = ("square", "circle", "triangle", "star", "ring")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
CLAUSES = (
    # (instruction text, action, subject, goal)
    ("make the {shape} {colour}", "recolor", "the {shape}", "{colour}"),
    ("remove the {shape}", "remove", "the {shape}", "background only"),
    ("add a {colour} {shape} in the corner", "add", "a {colour} {shape}", "in the corner"),
    ("make the background {colour}", "recolor", "the background", "{colour}"),
)


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (action, subject, goal) the synthetic clauses can make, in a fixed order."""
    out = []
    for _, action, subject, goal in CLAUSES:
        for shape in SHAPES:
            for colour in COLOURS:
                combo = (action, subject.format(shape=shape, colour=colour), goal.format(shape=shape, colour=colour))
                if combo not in out:
                    out.append(combo)
    return out


def combination(triple: dict) -> tuple[str, str, str]:
    return (triple["action"], triple["subject"], triple["goal"])


def heldout_combinations(fraction: float, seed: int = 0) -> set[tuple[str, str, str]]:
    """A seeded ``fraction`` of :func:`all_combinations` to hold out, drawn so that every action, subject and goal
    word of a held-out combination still occurs in a combination that is not held out."""
    if not 0.0 <= fraction < 1.0:
        from refiner_rl.errors import ConfigError

        raise ConfigError(f"held-out fraction must be in [0, 1), got {fraction}")
    combos = all_combinations()
    rng = random.Random(seed)
    order = rng.sample(combos, len(combos))
    held: set[tuple[str, str, str]] = set()
    target = round(fraction * len(combos))
    for combo in order:
        if len(held) >= target:
            break
        kept = [c for c in combos if c not in held and c != combo]
        words = {w for c in kept for part in c for w in part.split()}
        if all(w in words for part in combo for w in part.split()):
            held.add(combo)
    return held


def split_by_combination(records: list[dict], heldout: set[tuple[str, str, str]]) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: the records none of whose triples has a held-out combination, and the others."""
    train, held = [], []
    for r in records:
        (held if any(combination(t) in heldout for t in r["decomposition"]) else train).append(r)
    return train, held


def synthetic_decompositions(n: int, seed: int = 0, size: int = 56) -> list[dict]:
    """``n`` records with PIL images (``size`` x ``size``) and 1-3 clauses each."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    records = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(60, 200) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        lo = rng.randrange(1, max(2, size // 3))
        draw.rectangle([lo, lo, lo + size // 3, lo + size // 3], fill=rng.choice(list(COLOURS.values())))
        texts, triples = [], []
        for _ in range(rng.randint(1, 3)):
            template, action, subject, goal = rng.choice(CLAUSES)
            values = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS))}
            texts.append(template.format(**values))
            triples.append({"action": action, "subject": subject.format(**values), "goal": goal.format(**values)})
        instruction = ", ".join(texts[:-1]) + (" and " if len(texts) > 1 else "") + texts[-1]
        records.append({"id": f"syn-{i}", "image": img, "instruction": instruction, "decomposition": triples})
    return records


def synthetic_split(
    n: int, seed: int = 0, size: int = 56, *, heldout_fraction: float = 0.0, heldout_seed: int = 0, train: bool = True
) -> list[dict]:
    """``n`` synthetic records on the training (``train``) or held-out side of :func:`split_by_combination`; with
    ``heldout_fraction`` 0 simply :func:`synthetic_decompositions`. Records are drawn from ``seed`` until ``n``
    fall on the asked side."""
    if heldout_fraction <= 0:
        return synthetic_decompositions(n, seed, size)
    heldout = heldout_combinations(heldout_fraction, heldout_seed)
    out: list[dict] = []
    draw = 0
    while len(out) < n:
        batch = synthetic_decompositions(max(2 * n, 16), seed + 1000 * draw, size)
        out += split_by_combination(batch, heldout)[0 if train else 1]
        draw += 1
    return [{**r, "id": f"syn-{i}"} for i, r in enumerate(out[:n])]


def write_synthetic_decompositions(
    folder: str, n: int, seed: int = 0, size: int = 56, records: list[dict] | None = None
) -> str:
    """Write ``n`` synthetic records (or the given ``records``) to ``folder/records.jsonl`` (images under
    ``folder/images``); returns the file."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "records.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in synthetic_decompositions(n, seed, size) if records is None else records:
            rel = os.path.join("images", f"{r['id']}.png")
            r["image"].save(os.path.join(folder, rel))
            f.write(json.dumps({**r, "image": rel}, ensure_ascii=False) + "\n")
    return path
