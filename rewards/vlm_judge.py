"""``vlm_judge``: a OneReward-style VLM judge; reward = P("Yes").

OneReward (arXiv 2508.21066) asks one VLM a yes/no question built from the task and one evaluation
dimension, and uses the probability of the "Yes" answer token as the reward. Two modes:

- ``pointwise``: one image, "Is this image good on <dimension>? Answer Yes or No."
- ``pairwise``: "Is Image A better than Image B on <dimension>?" with A = the sample and B = the record's
  ``draft`` (default) or ``reference`` (``compare_to``). ``both_orders`` also asks with A and B swapped and
  averages ``P(Yes | A, B)`` with ``1 - P(Yes | B, A)``: the judge is trained on both orders, and the
  average cancels its position bias.

``dimension`` may be a list; the reward is then the mean over dimensions (OneReward averages its loss
over the task's dimensions). A sample whose question failed for any dimension or order gets ``None``.

How P(Yes) is read (``prob``):

- ``yes_no`` (default): ``sum_yes e^l / (sum_yes e^l + sum_no e^l)``, the answer distribution
  renormalised over the Yes and No tokens only.
- ``softmax``: ``sum_yes softmax(l)``, the mass on Yes over the whole vocabulary.

Tokens: the local backend sums over the words of ``yes_words`` / ``no_words`` (default ``["Yes", " Yes"]`` /
``["No", " No"]``) that the tokenizer encodes as one token (none at all: a ConfigError at start-up); the server
backend matches ``top_logprobs`` tokens equal to a word once whitespace, "Ġ" and "▁" are stripped.

A judge trained by ``refiner-rl reward-model`` (:mod:`refiner_rl.onereward`) is asked what it was trained on: its
``onereward.json`` (read from ``model_name_or_path``, or ``judge_config`` for the server backend) gives the task's
dimensions, context images (``reference``, ``source`` = the draft column, ``mask``, shown before A and B), the
``view`` of A and B (``interleave`` or ``beside``: each shown with the record's reference in one image, as in
training), question and answer words, unless the recipe sets them. Pairwise and local, it is differentiable: :meth:`VLMJudge.score_tensors`
(``compare_to: baseline`` compares with the reward-gradient trainer's reference images).

Backends (the model, client and question code is :mod:`refiner_rl.vlm`; this file is only the reward):

- ``local``: a transformers VLM (:class:`refiner_rl.vlm.LocalVLM`: Qwen2-VL / Qwen2.5-VL class), loaded once
  (shared between judges with the same settings), frozen, in eval mode. One batched forward per ``batch_size``
  questions; the logits are read at the last position, no generation.
- ``server``: an OpenAI-compatible chat-completions server (vLLM, SGLang, or ``python -m refiner_rl.vlm.server``)
  through :class:`refiner_rl.vlm.ChatClient`: one request per question, images as base64 PNG data URLs,
  ``max_tokens=1``, ``temperature=0``, ``logprobs=true``, ``top_logprobs``. The questions of a batch run
  concurrently (``max_concurrency``); each attempt is capped at ``timeout`` seconds, with ``max_retries``
  retries after ``backoff * 2**(k-1)`` seconds on timeouts, connection errors, 408, 429 and 5xx; a server that
  still fails is left alone for ``down_for`` seconds (its questions score ``None`` at once); ``deadline`` caps one
  batch. One batch therefore waits at most ``refiner_rl.vlm.worst_case_seconds`` =
  ``min(deadline, lookup + (max_retries + 1) * timeout + backoff * (2**max_retries - 1))`` (``lookup``, the same
  again, only without ``model``): 42 s at the defaults. A question without an answer scores ``None``. The API
  key is read from the environment variable named by ``api_key_env`` and is never logged. This backend is
  async: :func:`refiner_rl.scoring.score_batch` awaits it alongside the batch's other async rewards.

Example recipe entry::

    rewards:
      - name: vlm_judge
        weight: 0.5
        mode: pairwise
        compare_to: draft
        both_orders: true
        dimension: [detail_fidelity, consistency]
        backend: server
        base_url: http://localhost:8000/v1
        model: Qwen/Qwen2.5-VL-7B-Instruct
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from refiner_rl.errors import RewardError
from refiner_rl.onereward.collator import with_reference
from refiner_rl.onereward.templates import CONTEXT_FIELDS, CONTEXT_LABELS, VIEWS, judge_settings, shown_fields
from refiner_rl.scoring import loop
from refiner_rl.scoring.base import BASELINE_FIELD, Reward, as_image_tensor, column_value, to_pil
from refiner_rl.scoring.registry import register_reward
from refiner_rl.vlm.client import ChatClient, ServerSettings, first_token_top_logprobs
from refiner_rl.vlm.local import LocalVLM
from refiner_rl.vlm.questions import (
    DIMENSIONS,
    TASKS,
    answer_token_ids,
    build_conversation,
    build_query,
    check_template,
    p_yes_from_logits,
    p_yes_from_top_logprobs,
    to_openai_messages,
)

logger = logging.getLogger(__name__)


@register_reward
class VLMJudge(Reward):
    """OneReward-style VLM judge: P("Yes") that the sample is good (pointwise) or better than the draft (pairwise).

    Options:

    *The question*: ``mode`` (``pointwise`` | ``pairwise``), ``compare_to`` (``draft`` | ``reference`` |
    ``baseline``: the image B of pairwise mode), ``both_orders``, ``context``, ``view``, ``judge_config``, ``task`` (``refine`` | ``fill`` | ``extend`` | ``removal``, or
    your own with ``task_description``), ``dimension`` (one or a list of ``structure``, ``consistency``,
    ``text_alignment``, ``aesthetics``, ``detail_fidelity``, ``removal_quality``, or your own with
    ``dimension_description``), ``include_prompt`` (``auto`` | ``always`` | ``never``), ``template``,
    ``system_prompt``.

    *The answer*: ``prob`` (``yes_no`` | ``softmax``), ``yes_words``, ``no_words``.

    *Local backend*: ``model_name_or_path``, ``torch_dtype`` (default: ``dtype``), ``trust_remote_code``,
    ``min_pixels``, ``max_pixels``, ``batch_size``.

    *Server backend*: ``base_url``, ``model`` (default: the first of ``/v1/models``, asked once), ``api_key_env``,
    ``top_logprobs``, and the bounds of :class:`refiner_rl.vlm.ServerSettings` (seconds): ``timeout`` (10, per
    attempt), ``max_retries`` (1), ``backoff`` (1), ``max_concurrency`` (8), ``down_for`` (60), ``deadline`` (45,
    per batch).
    """

    name = "vlm_judge"
    required_fields = ("draft",)  # of the default options; set per instance in __init__
    differentiable = True  # pairwise, local backend (set per instance in __init__): score_tensors

    def __init__(
        self,
        mode: str = "pairwise",
        compare_to: str = "draft",
        both_orders: bool = False,
        task: str = "refine",
        dimension: str | Sequence[str] | None = None,
        include_prompt: str = "auto",
        template: str | None = None,
        task_description: str | None = None,
        dimension_description: str | None = None,
        system_prompt: str | None = None,
        context: Sequence[str] | None = None,
        view: str | None = None,
        judge_config: str | None = None,
        prob: str | None = None,
        yes_words: Sequence[str] | None = None,
        no_words: Sequence[str] | None = None,
        backend: str = "local",
        model_name_or_path: str | None = None,
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        batch_size: int = 8,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = ServerSettings.timeout,
        max_retries: int = ServerSettings.max_retries,
        backoff: float = ServerSettings.backoff,
        max_concurrency: int = ServerSettings.max_concurrency,
        down_for: float = ServerSettings.down_for,
        deadline: float = ServerSettings.deadline,
        top_logprobs: int = 20,
        **base_kwargs,
    ):
        super().__init__(**base_kwargs)
        trained = judge_settings(judge_config or (model_name_or_path if backend == "local" else None), judge_config)
        trained_task = trained.tasks.get(task) if trained else None
        if trained_task:  # a judge trained with refiner-rl reward-model: ask what it was trained on
            dimension = dimension or trained_task["dimensions"]
            task_description = task_description or trained_task["description"]
            template = template or (trained.template if mode == "pairwise" else None)
            context = trained_task.get("context", []) if context is None else context
            view = trained_task.get("view", "separate") if view is None else view
        if trained:
            prob, yes_words, no_words = (
                prob or trained.extra.get("prob"),
                yes_words or trained.extra.get("yes_words"),
                no_words or trained.extra.get("no_words"),
            )
        self.dimension_descriptions = dict(trained.dimensions) if trained else dict(DIMENSIONS)
        dimension, prob = dimension or "detail_fidelity", prob or "yes_no"
        yes_words, no_words = yes_words or ("Yes", " Yes"), no_words or ("No", " No")
        self.context, self.view = list(context or []), view or "separate"
        choices = {
            "mode": (mode, ("pointwise", "pairwise")),
            "compare_to": (compare_to, ("draft", "reference", BASELINE_FIELD)),
            "include_prompt": (include_prompt, ("auto", "always", "never")),
            "prob": (prob, ("yes_no", "softmax")),
            "backend": (backend, ("local", "server")),
            "view": (self.view, VIEWS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"vlm_judge: `{key}: {value}` is not supported; use one of: {', '.join(allowed)}")
        self.dimensions = [dimension] if isinstance(dimension, str) else list(dimension)
        if not self.dimensions:
            raise ValueError("vlm_judge: `dimension` is empty; name at least one, e.g. detail_fidelity")
        if task not in TASKS and not task_description:
            raise ValueError(
                f"vlm_judge: unknown `task: {task}`; known: {', '.join(TASKS)} (or set `task_description`)"
            )
        for dim in self.dimensions:
            if dim not in self.dimension_descriptions and not dimension_description:
                raise ValueError(
                    f"vlm_judge: unknown `dimension: {dim}`; known: {', '.join(self.dimension_descriptions)} (or set "
                    "`dimension_description`)"
                )
        for item in self.context:
            if item not in CONTEXT_FIELDS or mode != "pairwise":
                raise ValueError(
                    f"vlm_judge: `context: {item}`: use any of {', '.join(CONTEXT_FIELDS)} (pairwise mode)"
                )
        if template is not None:
            check_template(template)
        if self.view != "separate" and mode != "pairwise":
            raise ValueError(
                f"vlm_judge: `view: {self.view}` shows A and B with the reference; it needs `mode: pairwise`"
            )
        if both_orders and mode != "pairwise":
            raise ValueError("vlm_judge: `both_orders: true` swaps images A and B, so it needs `mode: pairwise`")
        self.mode, self.compare_to, self.both_orders = mode, compare_to, bool(both_orders)
        self.task, self.include_prompt, self.template = task, include_prompt, template
        self.task_description, self.dimension_description, self.system_prompt = (
            task_description,
            dimension_description,
            system_prompt,
        )
        self.prob, self.yes_words, self.no_words = prob, list(yes_words), list(no_words)
        self.backend = backend
        self.required_fields = (compare_to, *(self._column(c) for c in self._shown())) if mode == "pairwise" else ()
        self.differentiable = backend == "local" and mode == "pairwise"

        if backend == "local":
            if not model_name_or_path:
                raise ValueError("vlm_judge: `backend: local` needs `model_name_or_path` (a hub id or a local folder)")
            dtype = torch_dtype or self.dtype
            if isinstance(dtype, str) and dtype != "auto":
                if not isinstance(getattr(torch, dtype, None), torch.dtype):
                    raise ValueError(
                        f"vlm_judge: `torch_dtype: {dtype}` is not a torch dtype; use auto, float32, bfloat16 or float16"
                    )
                dtype = getattr(torch, dtype)
            self.vlm = LocalVLM.shared(
                model_name_or_path,
                device=self.device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
            )
            self.batch_size = int(batch_size)
            self.yes_ids, self.no_ids = answer_token_ids(
                self.vlm.tokenizer, self.yes_words, self.no_words, f"vlm_judge's {model_name_or_path}"
            )
        else:
            if not base_url:
                raise ValueError("vlm_judge: `backend: server` needs `base_url`, e.g. http://localhost:8000/v1")
            self.top_logprobs_n = int(top_logprobs)
            settings = ServerSettings(
                timeout=float(timeout),
                max_retries=int(max_retries),
                backoff=float(backoff),
                max_concurrency=int(max_concurrency),
                down_for=float(down_for),
                deadline=float(deadline),
            )
            self.client = ChatClient(base_url, model=model, api_key=os.environ.get(api_key_env), settings=settings)

    @property
    def is_async(self) -> bool:
        """The server backend waits on HTTP: :func:`refiner_rl.scoring.score_batch` awaits it concurrently."""
        return self.backend == "server"

    def to(self, device: str | torch.device) -> VLMJudge:
        super().to(device)
        if self.backend == "local":  # the model is shared by judges with the same settings: they all move
            self.vlm.to(self.device)
        return self

    # -- questions ----------------------------------------------------------------------------------
    def query(self, dimension: str, prompt: str = "") -> str:
        return build_query(
            mode=self.mode,
            task=self.task,
            dimension=dimension,
            prompt=prompt,
            include_prompt=self.include_prompt,
            template=self.template,
            task_description=self.task_description,
            dimension_description=self.dimension_description or self.dimension_descriptions.get(dimension),
        )

    @staticmethod
    def _column(field: str) -> str:
        """The batch column a context image comes from (the project's draft is the edit's source)."""
        return "draft" if field == "source" else field

    def _shown(self) -> list[str]:
        """The record images each question needs besides A and B: the context, and the reference for a ``view``."""
        return shown_fields(self.context, self.view)

    def conversations(
        self, prompt: str, sample: Any, other: Any = None, context: Sequence[Any] = (), pil: bool = True
    ) -> list[list[dict]]:
        """The chats asked for one sample: per dimension, (A, B) then, with ``both_orders``, (B, A); the
        ``context`` images (one per :meth:`_shown` field) come first, and with a ``view`` other than ``separate``
        A and B are each shown with the reference in one image (:func:`~refiner_rl.onereward.collator.with_reference`,
        as in training). ``pil=False`` keeps tensors (and their gradient) for :meth:`score_tensors`."""
        image = to_pil if pil else (lambda x: as_image_tensor(x))
        sample = image(sample)
        other = image(other) if self.mode == "pairwise" else None
        images = dict(zip(self._shown(), (image(c) for c in context)))
        if self.view != "separate":
            sample, other = (with_reference(x, images["reference"], self.view) for x in (sample, other))
        shown = [(CONTEXT_LABELS[f], images[f]) for f in self.context]
        orders = (
            [[sample]]
            if other is None
            else ([[sample, other], [other, sample]] if self.both_orders else [[sample, other]])
        )
        return [
            build_conversation(self.query(dim, prompt), pair, self.system_prompt, shown)
            for dim in self.dimensions
            for pair in orders
        ]

    def local_p_yes(self, conversations: Sequence[list[dict]]) -> list[float | None]:
        """P(Yes) of each chat from the local model; all ``None`` when the forward fails."""
        if not conversations:
            return []
        try:
            logits = self.vlm.next_token_logits(conversations, self.batch_size)
        except Exception:  # a bad batch must not stop training; the trainer counts the None
            logger.warning("vlm_judge: local forward failed for %d questions", len(conversations), exc_info=True)
            return [None] * len(conversations)
        return [float(p) for p in p_yes_from_logits(logits, self.yes_ids, self.no_ids, self.prob)]

    async def server_p_yes(self, conversations: Sequence[list[dict]]) -> list[float | None]:
        """P(Yes) of each chat from the server (concurrent, bounded: see the module docstring)."""
        bodies = [
            {
                "messages": to_openai_messages(c),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs_n,
            }
            for c in conversations
        ]
        probs: list[float | None] = []
        for reply in await self.client.chat_many(bodies):
            top = first_token_top_logprobs(reply)
            probs.append(
                None if top is None else p_yes_from_top_logprobs(top, self.yes_words, self.no_words, self.prob)
            )
        return probs

    # -- the reward ---------------------------------------------------------------------------------
    def _questions(self, prompts: Sequence[str], completions: Sequence[Any], columns: dict):
        """Every chat of the batch and the sample each belongs to."""
        others: Sequence[Any] = [None] * len(completions)
        if self.mode == "pairwise":
            if columns.get(self.compare_to) is None:
                raise ValueError(
                    f"vlm_judge (mode: pairwise, compare_to: {self.compare_to}) needs the `{self.compare_to}` column; "
                    f"got: {', '.join(sorted(columns)) or 'none'}. Use `mode: pointwise` to judge the sample alone."
                )
            others = [column_value(columns, self.compare_to, i) for i in range(len(completions))]
        contexts = self._contexts(len(completions), columns)
        chats: list[list[dict]] = []
        owner: list[int] = []
        unreadable: list[str] = []
        for i, (prompt, sample, other) in enumerate(zip(prompts, completions, others)):
            if sample is None or (self.mode == "pairwise" and other is None) or None in contexts[i]:
                continue
            try:
                convs = self.conversations(prompt, sample, other, contexts[i])
            except Exception as err:  # noqa: BLE001 - an unreadable image scores None
                unreadable.append(f"{i} ({err})")
                continue
            chats += convs
            owner += [i] * len(convs)
        if unreadable:
            logger.warning("vlm_judge: cannot read the images of sample(s) %s", ", ".join(unreadable))
        return chats, owner

    def _contexts(self, n: int, columns: dict) -> list[list[Any]]:
        """Per sample, the images of :meth:`_shown` (``None`` where the record has none); a ValueError naming the
        column when the batch has none at all."""
        for field in self._shown():
            if columns.get(self._column(field)) is None:
                why = f"context: {field}" if field in self.context else f"view: {self.view}"
                raise ValueError(
                    f"vlm_judge ({why}) needs the `{self._column(field)}` column; got: "
                    f"{', '.join(sorted(columns)) or 'none'}"
                )
        return [[column_value(columns, self._column(f), i) for f in self._shown()] for i in range(n)]

    def score_tensors(self, images: torch.Tensor, columns: dict) -> torch.Tensor:
        """Differentiable pairwise score ``[B]`` of ``images`` ``[B, 3, H, W]`` in [0, 1] against
        ``columns[compare_to]`` (with ``compare_to: baseline``, the reward-gradient trainer's reference images):
        the same questions and P(Yes) as :meth:`score`, with the image processor done in torch
        (:meth:`refiner_rl.vlm.LocalVLM.encode_tensors`), so the gradient of P(Yes) reaches the pixels. NaN where
        the sample's comparison or context image is missing."""
        if not self.differentiable:
            raise RewardError(
                "vlm_judge: score_tensors needs `backend: local` and `mode: pairwise` (a server returns no gradient)"
            )
        n = images.shape[0]
        if columns.get(self.compare_to) is None:
            raise RewardError(f"vlm_judge (compare_to: {self.compare_to}) needs the `{self.compare_to}` column")
        prompts = columns.get("prompt") or columns.get("prompts") or [""] * n
        contexts = self._contexts(n, columns)
        chats, owner = [], []
        for i in range(n):
            other = column_value(columns, self.compare_to, i)
            if other is None or None in contexts[i]:
                continue
            other = as_image_tensor(other).detach()
            convs = self.conversations(
                prompts[i], images[i], other, [as_image_tensor(c) for c in contexts[i]], pil=False
            )
            chats += convs
            owner.append(i)
        out = torch.full((n,), float("nan"), device=images.device)
        if not chats:
            return out
        logits = torch.cat(
            [
                self.vlm.answer_logits(self.vlm.encode_tensors(chats[k : k + self.batch_size]))
                for k in range(0, len(chats), self.batch_size)
            ]
        )
        p = p_yes_from_logits(logits, self.yes_ids, self.no_ids, self.prob).view(len(owner), -1)
        if self.both_orders:  # (A, B), (B, A) per dimension
            p = (p[:, 0::2] + 1.0 - p[:, 1::2]) / 2.0
        return out.index_put((torch.tensor(owner, device=images.device),), p.mean(-1).to(images.device))

    def _combine(self, n: int, owner: list[int], probs: list[float | None]) -> list[float | None]:
        """Per sample: the mean over dimensions (of the order-averaged P(Yes)); ``None`` if any question failed."""
        per_sample = len(self.dimensions) * (2 if self.both_orders else 1)
        by_sample: dict[int, list[float | None]] = {}
        for i, p in zip(owner, probs):
            by_sample.setdefault(i, []).append(p)
        scores: list[float | None] = []
        for i in range(n):
            ps = by_sample.get(i)
            if ps is None or len(ps) != per_sample or any(p is None for p in ps):
                scores.append(None)
                continue
            if self.both_orders:  # chats come as (A, B), (B, A) per dimension
                ps = [(ps[k] + 1.0 - ps[k + 1]) / 2.0 for k in range(0, len(ps), 2)]
            scores.append(sum(ps) / len(ps))
        return scores

    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        if self.backend == "server":
            return loop.run(self.ascore(prompts, completions, **columns))
        chats, owner = self._questions(prompts, completions, columns)
        return self._combine(len(completions), owner, self.local_p_yes(chats))

    async def ascore(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        if self.backend != "server":
            return self.score(prompts, completions, **columns)
        chats, owner = self._questions(prompts, completions, columns)
        return self._combine(len(completions), owner, await self.server_p_yes(chats) if chats else [])
