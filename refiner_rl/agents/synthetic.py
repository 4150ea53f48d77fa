"""A small synthetic decomposition set: coloured-shape images and compound instructions with their triples.

Each record joins one to three clauses ("make the square red", "remove the circle", "add a star in the
corner") into one instruction and keeps the clauses' triples as ground truth. Used by the tiny recipe and the
tests; ``write_synthetic_decompositions`` writes PNGs and a ``records.jsonl`` with relative paths, the layout
users give.
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


def write_synthetic_decompositions(folder: str, n: int, seed: int = 0, size: int = 56) -> str:
    """Write ``n`` synthetic records to ``folder/records.jsonl`` (images under ``folder/images``); returns the file."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "records.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in synthetic_decompositions(n, seed, size):
            rel = os.path.join("images", f"{r['id']}.png")
            r["image"].save(os.path.join(folder, rel))
            f.write(json.dumps({**r, "image": rel}, ensure_ascii=False) + "\n")
    return path
