"""Text-only rewards of the decomposition agent, as plain TRL reward functions.

Every function here has TRL's reward signature ``f(prompts, completions, **columns) -> list[float]`` and
works in ``trl.GRPOTrainer`` unchanged: ``completions`` are strings or conversational messages, and the
ground truth is the dataset column ``decomposition`` (a list of ``{action, subject, goal}`` per record).
None of them looks at an image. A completion that cannot be read scores 0; only a record without ground
truth raises (:class:`~refiner_rl.errors.DataError` naming it).

- ``plan_format_reward``: 1 when the completion is a well-formed plan (:func:`~refiner_rl.agents.plan.parse_plan`),
  else 0 (no tags, a nested, unclosed or stray tag, an empty field, text outside the triples, longer than
  ``MAX_CHARS``).
- ``plan_format_partial_reward`` (shaping, ours, not the paper's): 1 for a well-formed plan, else
  ``0.5 * (distinct tag strings present) / 6 + 0.4 * (components with a well-formed span) / 3`` (at most 0.9),
  0 past ``MAX_CHARS``. It gives a small or untrained model a gradient before it writes whole plans.
- ``action_f1_reward``, ``subject_f1_reward``, ``goal_f1_reward``: F1 between the predicted and the
  ground-truth components of one kind (:func:`component_f1`), read leniently
  (:func:`~refiner_rl.agents.plan.extract_components`). ImageEdit-R1 (arXiv 2603.08059) scores each
  component by F1 rather than exact match.

F1 (``match: token``, the default): ``P``, ``G`` = multisets of the word tokens of all predicted / ground-truth
components of the kind (NFKC, case-folded), ``overlap = |P ∩ G|`` (multiset), ``precision = overlap / |P|``,
``recall = overlap / |G|``, ``F1 = 2 precision recall / (precision + recall)``; 0 when either side is empty
(1 when both are). ``match: phrase`` does the same over whole components (a component's tokens joined by
one space), so "red coat" and "coat" do not match at all. Both ignore order; a duplicated prediction counts
twice in ``|P|`` and once in the overlap.

Combination: pass the four functions to ``GRPOTrainer`` with ``reward_weights`` (TRL's weighted sum), or
one function from :func:`make_decomposition_reward` (weighted sum, or ``gated``: format x weighted F1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from refiner_rl.agents.plan import (
    COMPONENTS,
    MAX_CHARS,
    TAGS,
    completion_text,
    extract_components,
    normalize_tokens,
    parse_plan,
)
from refiner_rl.errors import ConfigError, DataError

MATCHES = ("token", "phrase")


def f1(pred: Counter, gold: Counter) -> float:
    """Multiset F1: ``2 |P ∩ G| / (|P| + |G|)`` (equal to ``2pr / (p + r)``); 1 when both are empty."""
    n_pred, n_gold = sum(pred.values()), sum(gold.values())
    if n_pred == 0 and n_gold == 0:
        return 1.0
    overlap = sum((pred & gold).values())
    return 2.0 * overlap / (n_pred + n_gold)


def _bag(components: Sequence[str], match: str) -> Counter:
    if match == "token":
        return Counter(tok for c in components for tok in normalize_tokens(c))
    return Counter(p for p in (" ".join(normalize_tokens(c)) for c in components) if p)


def component_f1(predicted: Sequence[str], gold: Sequence[str], match: str = "token") -> float:
    """F1 between two lists of components of one kind (see the module docstring)."""
    if match not in MATCHES:
        raise ConfigError(f"unknown F1 `match: {match}`; use one of: {', '.join(MATCHES)}")
    return f1(_bag(predicted, match), _bag(gold, match))


def gold_triples(columns: dict, i: int) -> list[dict[str, str]]:
    """The ground-truth triples of sample ``i`` from the ``decomposition`` column (a list of dicts, or the
    dict of lists ``datasets`` may return); a :class:`DataError` naming the record when there are none."""
    column = columns.get("decomposition")
    value = column[i] if column is not None and i < len(column) else None
    if isinstance(value, dict) and all(isinstance(value.get(c), list) for c in COMPONENTS):
        value = [dict(zip(COMPONENTS, row)) for row in zip(*(value[c] for c in COMPONENTS))]
    if not value or not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        ids = columns.get("id")
        name = f"record id={ids[i]!r}" if ids is not None and i < len(ids) else f"sample {i} of the batch"
        raise DataError(
            f"{name} has no ground-truth `decomposition` (a list of {{action, subject, goal}}); the planner "
            "rewards need it in every record"
        )
    return [{c: str(t.get(c) or "") for c in COMPONENTS} for t in value]


def plan_format_reward(prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **columns) -> list[float]:
    """1 for a well-formed plan, else 0."""
    return [1.0 if parse_plan(completion_text(c)) is not None else 0.0 for c in completions]


def partial_format_score(text: str) -> float:
    """The partial-credit format score of one completion (see the module docstring)."""
    if not text or len(text) > MAX_CHARS:
        return 0.0
    if parse_plan(text) is not None:
        return 1.0
    present = sum(1 for t in TAGS if t in text)
    spans = extract_components(text)
    complete = sum(1 for c in COMPONENTS if spans[c])
    return 0.5 * present / len(TAGS) + 0.4 * complete / len(COMPONENTS)


def plan_format_partial_reward(prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **columns) -> list[float]:
    """Partial-credit format reward (shaping; 1 only for a well-formed plan)."""
    return [partial_format_score(completion_text(c)) for c in completions]


def component_scores(completions: Sequence[Any], columns: dict, component: str, match: str) -> list[float]:
    out = []
    for i, c in enumerate(completions):
        gold = [t[component] for t in gold_triples(columns, i)]
        out.append(component_f1(extract_components(completion_text(c))[component], gold, match))
    return out


def make_f1_reward(component: str, match: str = "token") -> Callable[..., list[float]]:
    """The F1 reward of one component (``action``, ``subject`` or ``goal``) as a TRL reward function."""
    if component not in COMPONENTS:
        raise ConfigError(f"unknown component {component!r}; use one of: {', '.join(COMPONENTS)}")
    if match not in MATCHES:
        raise ConfigError(f"unknown F1 `match: {match}`; use one of: {', '.join(MATCHES)}")

    def reward(prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **columns) -> list[float]:
        return component_scores(completions, columns, component, match)

    reward.__name__ = reward.__qualname__ = f"{component}_f1_reward" + ("" if match == "token" else f"_{match}")
    reward.__doc__ = f"F1 ({match} match) between predicted and ground-truth `{component}` components."
    return reward


action_f1_reward = make_f1_reward("action")
subject_f1_reward = make_f1_reward("subject")
goal_f1_reward = make_f1_reward("goal")


def make_decomposition_reward(
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    *,
    match: str = "token",
    combine: str = "weighted_sum",
    partial_format: bool = False,
) -> Callable[..., list[float]]:
    """One reward from format and the three F1s; ``weights`` = (format, action, subject, goal).

    ``weighted_sum``: ``sum_k w_k r_k / sum_k w_k``. ``gated``: ``format x (sum_c w_c F1_c / sum_c w_c)`` over
    the three components, so a plan scores only when it is readable."""
    w = [float(x) for x in weights]
    if len(w) != 4 or any(x < 0 for x in w) or sum(w) <= 0 or (combine == "gated" and sum(w[1:]) <= 0):
        raise ConfigError(
            f"decomposition reward `weights` must be 4 non-negative numbers with a positive sum, got {weights}"
        )
    if combine not in ("weighted_sum", "gated"):
        raise ConfigError(f"unknown `combine: {combine}`; use weighted_sum or gated")
    fmt = plan_format_partial_reward if partial_format else plan_format_reward
    parts = [make_f1_reward(c, match) for c in COMPONENTS]

    def decomposition_reward(prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **columns) -> list[float]:
        f = fmt(prompts, completions, **columns)
        scores = [p(prompts, completions, **columns) for p in parts]
        out = []
        for i in range(len(completions)):
            f1s = [s[i] for s in scores]
            if combine == "gated":
                out.append(f[i] * sum(wc * x for wc, x in zip(w[1:], f1s)) / sum(w[1:]))
            else:
                out.append((w[0] * f[i] + sum(wc * x for wc, x in zip(w[1:], f1s))) / sum(w))
        return out

    return decomposition_reward


def planner_reward_funcs(names: Sequence[str], match: str = "token") -> list[Callable[..., list[float]]]:
    """Reward functions by name (``format``, ``format_partial``, ``action``, ``subject``, ``goal``, ``decomposition``)
    or dotted path ``pkg.module.function`` (as TRL's own GRPO script takes them)."""
    import importlib

    known = {
        "format": plan_format_reward,
        "format_partial": plan_format_partial_reward,
        "decomposition": make_decomposition_reward(match=match),
        **{c: make_f1_reward(c, match) for c in COMPONENTS},
    }
    out = []
    for name in names:
        if name in known:
            out.append(known[name])
        elif "." in name:
            module, _, attr = name.replace(":", ".").rpartition(".")
            try:
                out.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"reward_funcs: cannot import {name!r} ({err})") from err
        else:
            raise ConfigError(f"reward_funcs: unknown reward {name!r}; use one of {', '.join(known)} or a dotted path")
    return out
