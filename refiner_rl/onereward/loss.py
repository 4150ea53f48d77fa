"""The judge's pairwise loss and score, as pure functions of the answer-position logits.

Each preference pair is asked in both orders: ``(winner, loser)``, whose right answer is "Yes", and
``(loser, winner)``, whose right answer is "No". OneReward (arXiv 2508.21066) trains on

    L = -1/2 [ log P(Yes | winner, loser, q) + log P(No | loser, winner, q) ]

with P read from the Yes/No token logits (:func:`refiner_rl.vlm.questions.log_p_yes_no`: renormalised over the
Yes and No tokens, ``yes_no``, or over the whole vocabulary, ``softmax``). The judge's score of the first image
against the second, the one the ``vlm_judge`` reward uses with ``both_orders``, is the order-averaged

    s = 1/2 [ P(Yes | winner, loser) + 1 - P(Yes | loser, winner) ]

and a pair is judged right when ``s > 1/2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from refiner_rl.vlm.questions import log_p_yes_no


class PairOutput(NamedTuple):
    """Per pair ``[B]``: the loss, P(Yes | winner, loser), P(Yes | loser, winner) and the order-averaged score."""

    loss: torch.Tensor
    p_yes_forward: torch.Tensor
    p_yes_reversed: torch.Tensor
    score: torch.Tensor


def pairwise_judge_loss(
    logits_forward: torch.Tensor,
    logits_reversed: torch.Tensor,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    prob: str = "yes_no",
) -> PairOutput:
    """The loss and scores of ``B`` pairs from the logits ``[B, V]`` of ``(winner, loser)`` chats and of the
    same pairs as ``(loser, winner)`` chats (module docstring). Take ``.loss.mean()`` for the batch loss."""
    if logits_forward.shape != logits_reversed.shape:
        raise ValueError(
            f"the two orders must have the same shape, got {tuple(logits_forward.shape)} and {tuple(logits_reversed.shape)}"
        )
    log_yes_fwd, _ = log_p_yes_no(logits_forward, yes_ids, no_ids, prob)
    log_yes_rev, log_no_rev = log_p_yes_no(logits_reversed, yes_ids, no_ids, prob)
    loss = -0.5 * (log_yes_fwd + log_no_rev)
    p_fwd, p_rev = log_yes_fwd.exp(), log_yes_rev.exp()
    return PairOutput(loss, p_fwd, p_rev, 0.5 * (p_fwd + 1.0 - p_rev))
