"""``viescore``: GEdit-Bench's VIEScore, semantic consistency SC and perceptual quality PQ on 0-10 (↑).

VIEScore (Ku et al., arXiv 2312.14867; GEdit-Bench, arXiv 2504.17761) asks a VLM for 0-10 ratings and reports

    SC = min(success, not over-edited),   PQ = min(naturalness, no artifacts),   overall = sqrt(SC * PQ).

Here each rating is one question whose answer is a number from 0 to 10, read like the judge's P(Yes) from the
first answer token: ``rating = sum_k k p(k) / sum_k p(k)`` over the numbers ``k`` the tokenizer writes as one
token (local backend: next-token logits; server backend: ``top_logprobs``), so a rating is never a parse failure.
The four questions (adapted to refinement): *success*, reference and output: are the reference's fine details
reproduced; *over-editing*, draft and output: is everything outside the region kept; *naturalness* and
*artifacts*, the output alone. The judge is loaded and called through the ``vlm_judge`` machinery
(:class:`refiner_rl.vlm.LocalVLM` or :class:`refiner_rl.vlm.ChatClient`, chats built by
:func:`refiner_rl.vlm.questions.build_conversation`); the table names it. A record with an unanswered question
is counted as failed, never scored 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from refiner_rl.metrics.base import Metric, Scored, register_metric
from refiner_rl.metrics.vlm_score import build_judge, judge_name
from refiner_rl.scoring import loop
from refiner_rl.scoring.base import to_pil
from refiner_rl.vlm.client import first_token_top_logprobs
from refiner_rl.vlm.questions import build_conversation, to_openai_messages

SCALE = range(11)
QUESTIONS = {  # rating: (images, question)
    "success": (
        ("reference", "output"),
        "The first image is a reference that shows fine details (text, logos, faces, textures). The second image is "
        "a refined result that should reproduce them. Rate from 0 to 10 how faithfully the second image reproduces "
        "the reference's details (0: not at all, 10: perfectly). Answer with one number.",
    ),
    "overediting": (
        ("draft", "output"),
        "The first image is a draft and the second its refinement, which should change only the region being "
        "refined. Rate from 0 to 10 how well the second image keeps everything else of the first unchanged "
        "(0: completely changed, 10: untouched). Answer with one number.",
    ),
    "naturalness": (
        ("output",),
        "Rate from 0 to 10 how natural this image looks: plausible lighting, geometry and sense of distance "
        "(0: unnatural, 10: natural). Answer with one number.",
    ),
    "artifacts": (
        ("output",),
        "Rate from 0 to 10 how free this image is of artifacts: distortion, blur, noise, watermarks, broken "
        "details (0: full of artifacts, 10: none). Answer with one number.",
    ),
}


def expected_rating(logits: torch.Tensor, ids: dict[int, int]) -> torch.Tensor:
    """``sum_k k p(k) / sum_k p(k)`` from answer-position logits ``[B, V]``; ``ids`` maps rating -> token id."""
    values = torch.tensor(list(ids), dtype=torch.float64)
    p = logits.double()[:, list(ids.values())].softmax(-1)
    return (p * values).sum(-1)


def expected_rating_from_top_logprobs(top: Sequence[dict] | None) -> float | None:
    """The same from a server's ``top_logprobs`` (ratings missing from the top-k count as 0; none at all: None)."""
    found = {}
    for entry in top or ():
        token, lp = str(entry.get("token", "")).replace("Ġ", "").replace("▁", "").strip(), entry.get("logprob")
        if lp is not None and token.isdigit() and int(token) in SCALE:
            found[int(token)] = found.get(int(token), 0.0) + math.exp(float(lp))
    total = sum(found.values())
    return sum(k * p for k, p in found.items()) / total if total > 0 else None


@register_metric
class VIEScore(Metric):
    kind = "viescore"
    higher_is_better = True
    parts = ("SC", "PQ", "overall")
    required_fields = ("draft", "reference")

    def __init__(self, label: str | None = None, batch_size: int = 8, **judge_options):
        self.name = label or "viescore"
        judge_options.setdefault("mode", "pointwise")
        self.judge = build_judge(self.name, **judge_options)
        self.batch_size = int(batch_size)
        if self.judge.backend == "local":
            tok = self.judge.vlm.tokenizer
            self.ids = {}
            for k in SCALE:
                enc = tok.encode(str(k), add_special_tokens=False)
                if len(enc) == 1:
                    self.ids[k] = enc[0]
            if len(self.ids) < 2:
                raise ValueError(
                    f"the judge's tokenizer writes fewer than two of the numbers 0-10 as one token: {self.ids}"
                )

    def describe(self) -> str:
        return f"{self.name}: VIEScore 0-10 (SC, PQ, overall = sqrt(SC*PQ)) by judge {judge_name(self.judge)}"

    def _ratings(self, chats: list[list[dict]]) -> list[float | None]:
        if self.judge.backend == "local":
            try:
                logits = self.judge.vlm.next_token_logits(chats, self.batch_size)
            except Exception:  # noqa: BLE001 - a failed forward is counted per record
                return [None] * len(chats)
            return [float(v) for v in expected_rating(logits, self.ids)]
        bodies = [
            {
                "messages": to_openai_messages(c),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": self.judge.top_logprobs_n,
            }
            for c in chats
        ]
        replies = loop.run(self.judge.client.chat_many(bodies))
        return [expected_rating_from_top_logprobs(first_token_top_logprobs(r)) for r in replies]

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        n = outputs.shape[0]
        chats = []
        for i in range(n):
            images = {"output": outputs[i], "draft": records["draft"][i], "reference": records["reference"][i]}
            for shown, question in QUESTIONS.values():
                chats.append(build_conversation(question, [to_pil(images[k]) for k in shown], self.judge.system_prompt))
        ratings = torch.tensor(
            [math.nan if r is None else r for r in self._ratings(chats)], dtype=torch.float64
        ).reshape(n, len(QUESTIONS))
        sc = torch.minimum(ratings[:, 0], ratings[:, 1])
        pq = torch.minimum(ratings[:, 2], ratings[:, 3])
        values = torch.stack([sc, pq, (sc * pq).sqrt()], dim=1)
        notes = [None if not torch.isnan(values[i]).any() else "judge gave no answer" for i in range(n)]
        return Scored(values, notes)
