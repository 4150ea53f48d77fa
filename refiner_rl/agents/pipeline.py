"""The three agents of ImageEdit-R1 (arXiv 2603.08059): decompose, sequence, edit.

1. Decomposition agent (the trained planner): image + instruction -> ``<action>/<subject>/<goal>`` triples.
2. Sequencing agent (the same VLM, prompted, not trained): orders the triples and writes each as one atomic
   sub-instruction, one ``<step>…</step>`` per triple.
3. Editing agent (a frozen editor): applies the sub-instructions one after another, each output being the
   next input.

Fallbacks, each logged as a warning and recorded in the plan: a decomposition that does not parse
(:func:`~refiner_rl.agents.plan.parse_plan`) edits with the raw instruction in one step; a sequencer answer
that is not exactly one non-empty step per triple keeps the decomposition order with steps written by
:func:`~refiner_rl.agents.plan.sub_instruction`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field

from refiner_rl.agents.data import planner_messages, with_image
from refiner_rl.agents.plan import parse_plan, sub_instruction

logger = logging.getLogger(__name__)

SEQUENCER_PROMPT = (
    "The instruction for this image is: {instruction}\n"
    "It was split into these atomic edits (action | subject | goal):\n{edits}\n"
    "Order the edits so that each can be applied to the result of the previous one, and write each as one short "
    "editing instruction. Answer with one <step>instruction</step> per edit, in order, and nothing else."
)
_STEP_RE = re.compile(r"<step>([^<>]*)</step>")


@dataclass
class EditPlan:
    """What the planning agents decided for one request (saved as ``plan.json``)."""

    instruction: str
    steps: list[str]
    triples: list[dict] | None = None
    decomposition_text: str | None = None
    sequence_text: str | None = None
    warnings: list[str] = field(default_factory=list)


def raw_plan(instruction: str, reason: str | None = None) -> EditPlan:
    """One step with the instruction as given (no planner, or a planner answer that cannot be used)."""
    return EditPlan(instruction=instruction, steps=[instruction], warnings=[reason] if reason else [])


class Planner:
    """Decomposition and sequencing agents over one VLM (``vlm.generate(conversations, max_new_tokens)``)."""

    def __init__(self, vlm, *, max_new_tokens: int = 256, sequence: bool = True, system_prompt: str | None = None):
        self.vlm, self.max_new_tokens, self.sequence_steps, self.system_prompt = (
            vlm,
            max_new_tokens,
            sequence,
            system_prompt,
        )

    def decompose(self, image, instruction: str) -> str:
        chat = with_image(planner_messages(instruction, self.system_prompt), image)
        return self.vlm.generate([chat], self.max_new_tokens)[0]

    def sequence(self, image, instruction: str, triples: list[dict]) -> tuple[list[str] | None, str]:
        edits = "\n".join(f"{k + 1}. {t['action']} | {t['subject']} | {t['goal']}" for k, t in enumerate(triples))
        chat = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": SEQUENCER_PROMPT.format(instruction=instruction, edits=edits)},
                ],
            }
        ]
        text = self.vlm.generate([chat], self.max_new_tokens)[0]
        steps = [" ".join(s.split()) for s in _STEP_RE.findall(text)]
        return (steps if len(steps) == len(triples) and all(steps) else None), text

    def plan(self, image, instruction: str) -> EditPlan:
        text = self.decompose(image, instruction)
        triples = parse_plan(text.strip())
        if triples is None:
            reason = (
                f"the planner's decomposition could not be parsed ({text[:120]!r}); editing with the raw instruction"
            )
            logger.warning(reason)
            plan = raw_plan(instruction, reason)
            plan.decomposition_text = text
            return plan
        plan = EditPlan(
            instruction=instruction,
            steps=[sub_instruction(t) for t in triples],
            triples=triples,
            decomposition_text=text,
        )
        if self.sequence_steps:
            steps, plan.sequence_text = self.sequence(image, instruction, triples)
            if steps is None:
                reason = "the sequencer's answer is not one <step> per edit; keeping the decomposition order"
                logger.warning(reason)
                plan.warnings.append(reason)
            else:
                plan.steps = steps
        return plan


def run_edit(
    editor,
    image,
    instruction: str,
    *,
    planner: Planner | None = None,
    reference=None,
    mask=None,
    output_dir: str,
    num_steps: int | None = 10,
    seed: int = 0,
    resolution: int | None = None,
) -> dict:
    """Plan (when a planner is given), apply every step (inside ``mask`` when given), save ``input.png``,
    ``step_XX.png``, ``final.png`` and ``plan.json`` under ``output_dir``; returns the plan record (also the content of
    ``plan.json``)."""
    from refiner_rl.agents.editor import apply_edit, fit_image

    os.makedirs(output_dir, exist_ok=True)
    current = fit_image(image, editor, resolution)
    current.save(os.path.join(output_dir, "input.png"))
    plan = planner.plan(current, instruction) if planner is not None else raw_plan(instruction)
    files = []
    for k, step in enumerate(plan.steps, 1):
        current = apply_edit(editor, current, step, reference, mask=mask, num_steps=num_steps, seed=seed + k - 1)
        files.append(f"step_{k:02d}.png")
        current.save(os.path.join(output_dir, files[-1]))
    current.save(os.path.join(output_dir, "final.png"))
    record = {**asdict(plan), "planned": planner is not None, "images": files, "final": "final.png"}
    with open(os.path.join(output_dir, "plan.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    return record
