"""The tiny random planner: :func:`refiner_rl.vlm.tiny.build_tiny_vlm` with a vocabulary made for planning.

The byte-level BPE is trained on the synthetic instructions and plans, and the six plan tags are added as
ordinary (not special) single tokens: a random model emits a tag with probability about 6 / vocabulary size per
token, so GRPO has something to reinforce within minutes on a CPU. "Yes" and "No" are single tokens too, so the
same folder can serve as a tiny ``vlm_judge`` in tests.
"""

from __future__ import annotations


def planner_corpus() -> list[str]:
    from refiner_rl.agents.data import SYSTEM_PROMPT
    from refiner_rl.agents.plan import format_plan
    from refiner_rl.agents.synthetic import synthetic_decompositions

    records = synthetic_decompositions(200, seed=12345, size=16)
    plans = [format_plan(r["decomposition"]) for r in records]
    return ["Yes No Yes. No."] * 50 + [SYSTEM_PROMPT] * 5 + [r["instruction"] for r in records] + plans


def build_tiny_planner(folder: str, *, vocab_size: int = 400, seed: int = 0) -> str:
    """Write the tiny planner (model, processor, chat template) to ``folder``; returns ``folder``."""
    from refiner_rl.agents.plan import TAGS
    from refiner_rl.vlm.tiny import build_tiny_vlm

    return build_tiny_vlm(folder, planner_corpus(), vocab_size=vocab_size, added_tokens=TAGS, seed=seed)
