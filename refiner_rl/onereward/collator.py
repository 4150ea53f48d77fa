"""Chats of preference pairs, in both orders, for the judge's forward.

The conversation of a (task, dimension) pair is the one the ``vlm_judge`` reward asks at scoring time
(:func:`judge_conversation`): the task's context images (labelled), "Image A:", "Image B:", then the question.
A task's ``view`` may show A and B each with the record's reference in one image (:func:`with_reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from refiner_rl.data.images import load_image
from refiner_rl.onereward.templates import CONTEXT_LABELS, JudgeTemplates
from refiner_rl.vlm.questions import build_conversation


def judge_conversation(
    templates: JudgeTemplates,
    task: str,
    dimension: str,
    first: Any,
    second: Any,
    context: dict[str, Any],
    prompt: str = "",
    system_prompt: str | None = None,
) -> list[dict]:
    """The chat asking whether ``first`` (A) beats ``second`` (B) on ``dimension``; ``context`` maps each of the
    task's context fields (and ``reference``, where the task's ``view`` shows A and B with it) to its image (a
    missing one is a ``KeyError``: records are checked on loading)."""
    shown = [(CONTEXT_LABELS[name], context[name]) for name in templates.context(task)]
    view = templates.view(task)
    if view != "separate":
        first, second = (with_reference(x, context["reference"], view) for x in (first, second))
    return build_conversation(templates.query(task, dimension, prompt), [first, second], system_prompt, shown)


def group_names(templates: JudgeTemplates) -> list[str]:
    """``task/dimension`` of every pair of the templates, in a fixed order (the accuracy table's rows)."""
    return [f"{task}/{dim}" for task in templates.tasks for dim in templates.task_dimensions(task)]


class PairCollator:
    """Batch of ``B`` records -> processor inputs of ``2B`` chats, ``(winner, loser)`` then ``(loser, winner)``,
    left-padded (the answer position is the last one), plus ``groups`` ``[B]`` (index into :func:`group_names`)."""

    def __init__(self, processor, templates: JudgeTemplates, system_prompt: str | None = None):
        self.processor, self.templates, self.system_prompt = processor, templates, system_prompt
        self.groups = {name: i for i, name in enumerate(group_names(templates))}

    def conversations(self, records: Sequence[dict]) -> tuple[list[list[dict]], list[int]]:
        forward, backward, groups = [], [], []
        for rec in records:
            where = f"pair {rec.get('id')!r}"
            a, b = (load_image(rec[k], base_dir=None, where=f"{where} {k}") for k in ("image_a", "image_b"))
            winner, loser = (a, b) if rec["preferred"] == "a" else (b, a)
            context = {
                name: load_image(rec[name], base_dir=None, where=f"{where} {name}").convert("RGB")
                for name in self.templates.needs(rec["task"])
            }
            args = (self.templates, rec["task"], rec["dimension"])
            kwargs = {"prompt": rec.get("prompt") or "", "system_prompt": self.system_prompt}
            forward.append(judge_conversation(*args, winner, loser, context, **kwargs))
            backward.append(judge_conversation(*args, loser, winner, context, **kwargs))
            groups.append(self.groups[f"{rec['task']}/{rec['dimension']}"])
        return forward + backward, groups

    def __call__(self, records: Sequence[dict]) -> dict:
        chats, groups = self.conversations(records)
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        images = [[p["image"] for m in c for p in m["content"] if p["type"] == "image"] for c in chats]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        batch["groups"] = torch.tensor(groups, dtype=torch.long)
        return dict(batch)


def with_reference(candidate, reference, layout: str):
    """One image of ``candidate`` and ``reference`` (the reference is resized to the candidate's size if it differs)
    for a judge that compares them locally: ``beside`` (side by side, candidate left) or ``interleave`` (rows
    alternate: candidate row y, then reference row y, so each vision patch holds both at the same place). PIL images
    give a PIL image (training, scoring); ``[3, H, W]`` tensors in [0, 1] give a tensor through which the gradient
    reaches the candidate (the differentiable judge)."""
    if layout not in ("beside", "interleave"):
        raise ValueError(f"layout {layout!r}: use beside or interleave")
    if isinstance(candidate, torch.Tensor):
        r = reference.to(candidate)
        if r.shape[-2:] != candidate.shape[-2:]:
            r = torch.nn.functional.interpolate(
                r[None], size=tuple(candidate.shape[-2:]), mode="bicubic", antialias=True, align_corners=False
            )[0].clamp(0, 1)
        if layout == "beside":
            return torch.cat([candidate, r], dim=-1)
        c, h, w = candidate.shape
        return torch.stack([candidate, r], dim=-2).reshape(c, 2 * h, w)
    import numpy as np
    from PIL import Image

    if reference.size != candidate.size:
        reference = reference.resize(candidate.size, Image.BICUBIC)
    c, r = (np.asarray(x.convert("RGB")) for x in (candidate, reference))
    if layout == "beside":
        return Image.fromarray(np.concatenate([c, r], axis=1))
    return Image.fromarray(np.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:]))
