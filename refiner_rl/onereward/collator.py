"""Chats of preference pairs, in both orders, for the judge's forward.

The conversation of a (task, dimension) pair is the one the ``vlm_judge`` reward asks at scoring time
(:func:`judge_conversation`): the task's context images (labelled), "Image A:", "Image B:", then the question.
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
    task's context fields to its image (a missing one is a ``KeyError``: records are checked on loading)."""
    shown = [(CONTEXT_LABELS[name], context[name]) for name in templates.context(task)]
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
                for name in self.templates.context(rec["task"])
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
