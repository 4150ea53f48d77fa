"""The planner's text format: ``<action>…</action><subject>…</subject><goal>…</goal>`` triples.

A decomposition is one or more triples, in this tag order, with nothing but whitespace between and around
them. A field holds free text without ``<`` or ``>`` and is not empty. ImageEdit-R1 (arXiv 2603.08059) uses
these three tags; the exact grammar (whitespace, no angle brackets inside a field) is ours.

Two readings of a completion:

- :func:`parse_plan` (strict): the list of triples when the whole completion follows the grammar, else
  ``None``. The editing pipeline and the format reward use it.
- :func:`extract_components` (lenient): every well-formed, non-nested ``<tag>text</tag>`` span of each
  kind, wherever it is. The F1 rewards use it, so a completion with stray text still earns credit for the
  components it names.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

COMPONENTS = ("action", "subject", "goal")
TAGS = tuple(t for c in COMPONENTS for t in (f"<{c}>", f"</{c}>"))
MAX_CHARS = 4096  # longer completions are not parsed (format reward 0): a planner's answer is a few lines

# A field: leading whitespace, one visible character, the rest. Written so that a string matches it in one way only:
# the equivalent `[^<>]*[^<>\s][^<>]*` splits a field in many ways, and a plan that fails at its end (a truncated
# completion) backtracked through the product of every field's splits (3 triples and a cut-off 4th: minutes).
_FIELD = r"(\s*[^<>\s][^<>]*)"
_TRIPLE = rf"\s*<action>{_FIELD}</action>\s*<subject>{_FIELD}</subject>\s*<goal>{_FIELD}</goal>"
_TRIPLE_RE = re.compile(_TRIPLE)
_PLAN_RE = re.compile(rf"(?:{_TRIPLE})+\s*")
_SPAN_RE = re.compile(r"<(action|subject|goal)>([^<>]*)</\1>")


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a conversational one (``[{"role": "assistant", "content": …}]``,
    content a string or a list of ``{"type": "text", "text": …}`` parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts: list[str] = []
    for message in completion:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, (list, tuple)):
            parts += [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return "".join(parts)


def parse_plan(text: str, max_chars: int = MAX_CHARS) -> list[dict[str, str]] | None:
    """The triples of a completion that follows the grammar exactly (fields stripped), else ``None``."""
    if not text or len(text) > max_chars or not _PLAN_RE.fullmatch(text):
        return None
    return [{c: " ".join(v.split()) for c, v in zip(COMPONENTS, m.groups())} for m in _TRIPLE_RE.finditer(text)]


def extract_components(text: str, max_chars: int = MAX_CHARS) -> dict[str, list[str]]:
    """Every well-formed span ``<tag>text</tag>`` per component, in order (empty lists past ``max_chars``).

    A span whose text holds a tag (nesting) is not well formed, so only the innermost complete span counts."""
    out: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    if text and len(text) <= max_chars:
        for m in _SPAN_RE.finditer(text):
            out[m.group(1)].append(m.group(2))
    return out


def normalize_tokens(text: str) -> list[str]:
    """Word tokens of a component: NFKC-normalised, case-folded, ``\\w+`` runs (Unicode letters and digits)."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text or "").casefold())


def format_plan(triples: Sequence[dict[str, str]]) -> str:
    """Triples written in the planner's format, one per line (the inverse of :func:`parse_plan`)."""
    return "\n".join(
        f"<action>{t['action']}</action><subject>{t['subject']}</subject><goal>{t['goal']}</goal>" for t in triples
    )


def sub_instruction(triple: dict[str, str]) -> str:
    """A one-step instruction written from a triple when no sequencer rewrote it: ``"{action} {subject}: {goal}"``."""
    return f"{triple['action'].strip()} {triple['subject'].strip()}: {triple['goal'].strip()}"
