"""The yes/no question a VLM judge is asked, the chat it is asked in, and P(Yes) from the answer.

OneReward (arXiv 2508.21066) asks one VLM a yes/no question built from the task and one evaluation dimension
and takes the probability of the "Yes" answer token as the reward. This module builds that question
(:func:`build_query`), the chat around it in transformers' format (:func:`build_conversation`) or the OpenAI
schema (:func:`to_openai_messages`), and reads P(Yes) from next-token logits or from a server's
``top_logprobs``:

- ``yes_no``: ``sum_yes e^l / (sum_yes e^l + sum_no e^l)``, the answer distribution renormalised over the Yes
  and No tokens only;
- ``softmax``: ``sum_yes softmax(l)``, the mass on Yes over the whole vocabulary.

Shared by the ``vlm_judge`` reward, a judge trainer and the planner; nothing here loads a model or opens a
connection.
"""

from __future__ import annotations

import base64
import io
import math
import string
from collections.abc import Sequence
from typing import Any

import torch

TASKS = {
    "refine": "reference-guided detail refinement: fine details of a draft image (logos, text, faces, "
    "textures) were restored with the help of a reference image that shows them",
    "fill": "image fill: a masked region of an image was generated to match a text prompt",
    "extend": "image extension: an image was extended beyond its original borders",
    "removal": "object removal: an object was erased and its region filled with background",
}
DIMENSIONS = {
    "structure": "structure: objects have plausible shapes and geometry, with no distortion or broken parts",
    "consistency": "consistency: the edited region matches the rest of the image in lighting, colour, "
    "texture and style, with no visible seams",
    "text_alignment": "text alignment: the content follows the text prompt",
    "aesthetics": "aesthetics: the image is visually pleasing, sharp and free of artifacts",
    "detail_fidelity": "detail fidelity: fine details such as logos, text, faces and textures are sharp, "
    "legible and match the reference image",
    "draft_consistency": "consistency with the draft: apart from the restored details, the image keeps the "
    "draft's content, layout, colours and lighting",
    "removal_quality": "removal quality: the object is fully removed, with no residue, ghosting or new objects",
}
DEFAULT_TEMPLATES = {
    "pointwise": "This image is the result of {task_description}. Judge it on {dimension_description}."
    "{prompt_clause} Is the image good in this respect? Answer Yes or No.",
    "pairwise": "Image A and Image B are two results of {task_description}. Compare them on "
    "{dimension_description}.{prompt_clause} Is Image A better than Image B? Answer Yes or No.",
}
TEMPLATE_FIELDS = ("task", "dimension", "prompt", "task_description", "dimension_description", "prompt_clause")


def check_template(template: str) -> None:
    """Raise a ``ValueError`` naming the bad placeholder if ``template`` uses an unknown one."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"`template` is not a valid format string ({err}); write literal braces as {{{{ }}}}") from err
    for f in fields:
        if f.split(".")[0].split("[")[0] not in TEMPLATE_FIELDS:
            raise ValueError(f"`template` uses unknown placeholder {{{f}}}; known: {', '.join(TEMPLATE_FIELDS)}")


def build_query(
    *,
    mode: str = "pairwise",
    task: str = "refine",
    dimension: str = "detail_fidelity",
    prompt: str = "",
    include_prompt: str = "auto",
    template: str | None = None,
    task_description: str | None = None,
    dimension_description: str | None = None,
) -> str:
    """The judge's question for one (task, dimension, prompt).

    ``include_prompt``: ``auto`` puts the user prompt in only for ``text_alignment`` (as OneReward does),
    ``always`` / ``never`` force it. Placeholders: ``{task}``, ``{dimension}``, ``{prompt}`` (the raw prompt,
    empty when not included), ``{task_description}``, ``{dimension_description}`` and ``{prompt_clause}``
    (a sentence quoting the prompt, or empty).
    """
    with_prompt = {"auto": dimension == "text_alignment", "always": True, "never": False}[include_prompt]
    prompt = (prompt or "").strip() if with_prompt else ""
    return (template or DEFAULT_TEMPLATES[mode]).format(
        task=task,
        dimension=dimension.replace("_", " "),
        prompt=prompt,
        task_description=task_description or TASKS.get(task, task),
        dimension_description=dimension_description or DIMENSIONS.get(dimension, dimension.replace("_", " ")),
        prompt_clause=f' The text prompt is: "{prompt}".' if prompt else "",
    )


# -- P(Yes) ----------------------------------------------------------------------------------------


def log_p_yes_no(
    logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], prob: str = "yes_no"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P(Yes), log P(No))``, each ``[B]``, from the answer-position logits ``[B, V]``, differentiable.

    ``yes_no``: ``log P(Yes) = lse(l_yes) - lse(l_yes, l_no)`` and ``log P(No) = lse(l_no) - lse(l_yes, l_no)``;
    ``softmax``: the same with ``lse(l)`` over the whole vocabulary as the normaliser.
    """
    logits = logits.float()
    yes, no = logits[:, list(yes_ids)].logsumexp(-1), logits[:, list(no_ids)].logsumexp(-1)
    norm = logits.logsumexp(-1) if prob == "softmax" else torch.stack([yes, no], -1).logsumexp(-1)
    return yes - norm, no - norm


def p_yes_from_logits(
    logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], prob: str = "yes_no"
) -> torch.Tensor:
    """P(Yes) from the answer-position logits ``[B, V]`` (see the module docstring for both formulas)."""
    return log_p_yes_no(logits, yes_ids, no_ids, prob)[0].exp()


def single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the words ``tokenizer`` encodes as exactly one token (deduplicated, in order)."""
    ids: list[int] = []
    for word in words:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def answer_token_ids(tokenizer, yes_words: Sequence[str], no_words: Sequence[str], where: str) -> tuple[list, list]:
    """The single-token ids of ``yes_words`` and ``no_words``; a :class:`ConfigError` naming ``where`` (the model)
    when either set is empty or they share an id (P(Yes) would be undefined: NaN rewards later)."""
    yes_ids, no_ids = single_token_ids(tokenizer, yes_words), single_token_ids(tokenizer, no_words)
    if not yes_ids or not no_ids or set(yes_ids) & set(no_ids):
        from refiner_rl.errors import ConfigError

        raise ConfigError(
            f"the tokenizer of {where} has no single-token id for some of yes_words={list(yes_words)} / "
            f"no_words={list(no_words)} (or they overlap); set yes_words/no_words to words it encodes as one token"
        )
    return yes_ids, no_ids


def _norm_token(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").strip()


def p_yes_from_top_logprobs(
    top_logprobs: Sequence[dict], yes_words: Sequence[str], no_words: Sequence[str], prob: str = "yes_no"
) -> float | None:
    """P(Yes) from an OpenAI ``top_logprobs`` list (``[{"token": ..., "logprob": ...}, ...]``).

    ``None`` when neither Yes nor No is in the list. A word missing from the top-k counts as 0 (its true
    probability is below the smallest listed one).
    """
    yes_set, no_set = {_norm_token(w) for w in yes_words}, {_norm_token(w) for w in no_words}
    yes = no = 0.0
    found = False
    for entry in top_logprobs:
        token, lp = _norm_token(str(entry.get("token", ""))), entry.get("logprob")
        if lp is None or not (token in yes_set or token in no_set):
            continue
        found = True
        if token in yes_set:
            yes += math.exp(float(lp))
        else:
            no += math.exp(float(lp))
    if not found:
        return None
    if prob == "softmax":
        return min(1.0, yes)
    return yes / (yes + no) if yes + no > 0 else None


# -- images and conversations ----------------------------------------------------------------------


def png_data_url(pil_image) -> str:
    buf = io.BytesIO()
    pil_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_conversation(
    query: str, images: Sequence[Any], system_prompt: str | None = None, context: Sequence[tuple[str, Any]] = ()
) -> list[dict]:
    """A chat in transformers' format: ``context`` images first, each after its label (``("Reference", img)`` ->
    "Reference:"), then one image as is, or two as "Image A:" and "Image B:", then the question."""
    content: list[dict] = []
    for label, image in context:
        content += [{"type": "text", "text": f"{label}:"}, {"type": "image", "image": image}]
    if len(images) == 1:
        content.append({"type": "image", "image": images[0]})
    else:
        for label, image in zip("AB", images):
            content += [{"type": "text", "text": f"Image {label}:"}, {"type": "image", "image": image}]
    content.append({"type": "text", "text": query})
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def to_openai_messages(conversation: list[dict]) -> list[dict]:
    """The same chat with images as base64 PNG ``image_url`` parts (OpenAI chat-completions schema)."""
    out = []
    for message in conversation:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out
