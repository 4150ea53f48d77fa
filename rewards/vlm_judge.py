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

Tokens: "Yes" right after ``<|im_start|>assistant\\n`` is one token in Qwen's byte-level BPE, and so is
" Yes" (with a leading space, "ĠYes"). The local backend takes the id of every word in ``yes_words`` /
``no_words`` (default ``["Yes", " Yes"]`` / ``["No", " No"]``) that the tokenizer encodes as exactly one
token, and sums over them; words that split into several tokens are skipped. The server backend matches
``top_logprobs`` entries whose token text, with whitespace (and a byte-level "Ġ" or sentencepiece "▁")
stripped, equals a stripped yes/no word.

Backends:

- ``local``: a transformers VLM (Qwen2-VL / Qwen2.5-VL class, ``AutoModelForImageTextToText`` and
  ``AutoProcessor``), loaded once (shared between judges with the same settings), frozen, in eval mode.
  One batched forward per ``batch_size`` questions; the logits are read at the last position (the
  processor pads on the left), no generation.
- ``server``: an OpenAI-compatible chat-completions server (vLLM, SGLang, or
  ``python -m refiner_rl.scoring.vlm_server``): one request per question with images as base64 PNG data
  URLs, ``max_tokens=1``, ``temperature=0``, ``logprobs=true``, ``top_logprobs``. Timeouts, connection
  errors, 408, 429 and 5xx are retried with exponential backoff (``backoff * 2**attempt`` seconds) up to
  ``max_retries`` times; other 4xx are not retried. A question that still fails scores ``None``. The API
  key is read from the environment variable named by ``api_key_env`` and is never logged.

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

import base64
import http.client
import io
import json
import logging
import math
import os
import string
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from refiner_rl.scoring.base import (
    Reward,
    as_image_tensor,
    column_value,
    freeze,
    outside_zero3_init,
)
from refiner_rl.scoring.registry import register_reward

logger = logging.getLogger(__name__)

# -- the question ----------------------------------------------------------------------------------

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
    "legible and correct",
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
        raise ValueError(
            f"vlm_judge: `template` is not a valid format string ({err}); write literal braces as {{{{ }}}}"
        ) from err
    for f in fields:
        if f.split(".")[0].split("[")[0] not in TEMPLATE_FIELDS:
            raise ValueError(
                f"vlm_judge: `template` uses unknown placeholder {{{f}}}; known: {', '.join(TEMPLATE_FIELDS)}"
            )


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


def p_yes_from_logits(
    logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], prob: str = "yes_no"
) -> torch.Tensor:
    """P(Yes) from the answer-position logits ``[B, V]`` (see the module docstring for both formulas)."""
    logits = logits.float()
    yes_ids, no_ids = list(yes_ids), list(no_ids)
    if prob == "softmax":
        return logits.softmax(-1)[:, yes_ids].sum(-1)
    return logits[:, yes_ids + no_ids].softmax(-1)[:, : len(yes_ids)].sum(-1)


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


def to_pil(image: Any):
    """A PIL RGB image from a ``[3, H, W]`` tensor in [0, 1] (or anything ``as_image_tensor`` takes).

    Both backends quantise to uint8 here, so a server sees the very pixels the local model sees."""
    from PIL import Image

    t = as_image_tensor(image).detach().float().cpu().clamp(0, 1)
    arr = (t.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


def png_data_url(pil_image) -> str:
    buf = io.BytesIO()
    pil_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_conversation(query: str, images: Sequence[Any], system_prompt: str | None = None) -> list[dict]:
    """A chat in transformers' format: one image is shown as is, two as "Image A:" and "Image B:"."""
    content: list[dict] = []
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


# -- local backend ---------------------------------------------------------------------------------

_LOCAL_CACHE: dict[tuple, LocalVLM] = {}
_LOCAL_LOCK = threading.Lock()


class LocalVLM:
    """A frozen transformers VLM that returns next-token logits for a batch of chats.

    Also served over HTTP by :mod:`refiner_rl.scoring.vlm_server`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise OSError(
                f"vlm_judge: cannot load a processor from model_name_or_path={model_name_or_path!r} ({err}). Offline, point it "
                "at a local folder with the model's config, safetensors weights and processor/tokenizer files, fetched once "
                f"with `hf download {model_name_or_path} --local-dir DIR`, or use `backend: server`."
            ) from err
        if min_pixels is not None or max_pixels is not None:
            # Qwen2-VL image processors take the pixel budget as size={shortest_edge: min, longest_edge: max}
            # (min_pixels=/max_pixels= still work in transformers 5 but warn at every call).
            old = getattr(self.processor.image_processor, "size", None) or {}
            get = old.get if isinstance(old, dict) else lambda key: getattr(old, key, None)
            size = {
                "shortest_edge": min_pixels or get("shortest_edge"),
                "longest_edge": max_pixels or get("longest_edge"),
            }
            self.processor = AutoProcessor.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code, size=size
            )
        self.tokenizer = self.processor.tokenizer
        # Left padding puts every chat's answer position at index -1.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with outside_zero3_init():  # a frozen judge must stay whole under ZeRO-3 (SPEC §6)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        freeze(self.model).to(device)
        self.device = torch.device(device)
        self.lock = threading.Lock()  # one forward at a time when served from threads

    @classmethod
    def shared(cls, model_name_or_path: str, **kwargs) -> LocalVLM:
        """Load once per (path, settings): several judges (dimensions) share one model."""
        key = (str(model_name_or_path), *sorted((k, str(v)) for k, v in kwargs.items()))
        with _LOCAL_LOCK:
            if key not in _LOCAL_CACHE:
                _LOCAL_CACHE[key] = cls(model_name_or_path, **kwargs)
            return _LOCAL_CACHE[key]

    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the words the tokenizer encodes as exactly one token (deduplicated, in order)."""
        ids: list[int] = []
        for word in words:
            enc = self.tokenizer.encode(word, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        return ids

    def encode(self, conversations: Sequence[list[dict]]):
        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
        ]
        images = [[p["image"] for m in c for p in m["content"] if p["type"] == "image"] for c in conversations]
        kwargs = {"images": images} if any(images) else {}
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)

    @torch.no_grad()
    def last_logits(self, inputs) -> torch.Tensor:
        """Logits ``[B, V]`` (float32, CPU) at the last position of encoded chats: the first answer token."""
        with self.lock:
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()

    def next_token_logits(self, conversations: Sequence[list[dict]], batch_size: int = 8) -> torch.Tensor:
        """:meth:`last_logits` of ``conversations``, ``batch_size`` chats per forward."""
        out = [
            self.last_logits(self.encode(conversations[i : i + batch_size]))
            for i in range(0, len(conversations), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, 0)


# -- server backend --------------------------------------------------------------------------------

RETRY_STATUS = {408, 429}  # plus every 5xx


class ChatClient:
    """A small OpenAI chat-completions client (stdlib only) with timeouts, retries and a thread pool."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"vlm_judge: `base_url: {base_url}` must start with http:// or https://")
        root = base_url.rstrip("/")
        self.api_url = root if root.endswith("/v1") else root + "/v1"
        self.model, self._api_key = model, api_key or None
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.max_concurrency = max(1, int(max_concurrency))
        self._model_lock = threading.Lock()

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def request(self, path: str, body: dict | None = None) -> dict | None:
        """GET (no body) or POST JSON to ``{api_url}{path}``; the parsed reply, or ``None`` after retries."""
        url = self.api_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode() if body is not None else None
        reason = "unknown error"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                detail = err.read(300).decode("utf-8", "replace") if err.fp else ""
                err.close()
                reason = f"HTTP {err.code} {detail!r}"
                if err.code not in RETRY_STATUS and err.code < 500:
                    logger.warning("vlm_judge: %s answered %s; not retried", url, self._redact(reason))
                    return None
            except (OSError, http.client.HTTPException) as err:  # timeouts, refused, reset or cut connections
                reason = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            else:
                try:
                    return json.loads(raw.decode("utf-8"))
                except ValueError as err:
                    logger.warning("vlm_judge: %s sent a reply that is not JSON (%s)", url, err)
                    return None
        logger.warning("vlm_judge: %s failed %d times, last: %s", url, self.max_retries + 1, self._redact(reason))
        return None

    def served_model(self) -> str | None:
        """``model`` if given, else the first id listed by ``GET /v1/models`` (asked once)."""
        with self._model_lock:
            if self.model is None:
                listing = self.request("/models")
                try:
                    self.model = listing["data"][0]["id"] if listing else None
                except (KeyError, IndexError, TypeError):
                    logger.warning("vlm_judge: %s/models lists no model; set `model`", self.api_url)
            return self.model

    def top_logprobs(self, messages: list[dict], n: int) -> list[dict] | None:
        """``top_logprobs`` of the first answer token, or ``None``."""
        model = self.served_model()
        if model is None:
            return None
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": n,
        }
        reply = self.request("/chat/completions", body)
        try:
            return reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"] if reply else None
        except (KeyError, IndexError, TypeError):
            logger.warning(
                "vlm_judge: %s/chat/completions reply has no choices[0].logprobs.content[0].top_logprobs", self.api_url
            )
            return None

    def map(self, fn, items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


# -- the reward ------------------------------------------------------------------------------------


@register_reward
class VLMJudge(Reward):
    """OneReward-style VLM judge: P("Yes") that the sample is good (pointwise) or better than the draft (pairwise).

    Options:

    *The question*: ``mode`` (``pointwise`` | ``pairwise``), ``compare_to`` (``draft`` | ``reference``: the
    image B of pairwise mode), ``both_orders``, ``task`` (``refine`` | ``fill`` | ``extend`` | ``removal``, or
    your own with ``task_description``), ``dimension`` (one or a list of ``structure``, ``consistency``,
    ``text_alignment``, ``aesthetics``, ``detail_fidelity``, ``removal_quality``, or your own with
    ``dimension_description``), ``include_prompt`` (``auto`` | ``always`` | ``never``), ``template``,
    ``system_prompt``.

    *The answer*: ``prob`` (``yes_no`` | ``softmax``), ``yes_words``, ``no_words``.

    *Local backend*: ``model_name_or_path``, ``torch_dtype`` (default: ``dtype``), ``trust_remote_code``,
    ``min_pixels``, ``max_pixels``, ``batch_size``.

    *Server backend*: ``base_url``, ``model`` (default: the first of ``/v1/models``), ``api_key_env``,
    ``timeout`` (seconds), ``max_retries``, ``backoff`` (seconds), ``max_concurrency``, ``top_logprobs``.
    """

    name = "vlm_judge"
    required_fields = ("draft",)  # of the default options; set per instance in __init__
    kind = "pointwise"  # pairwise against a fixed image is still one score per sample

    def __init__(
        self,
        mode: str = "pairwise",
        compare_to: str = "draft",
        both_orders: bool = False,
        task: str = "refine",
        dimension: str | Sequence[str] = "detail_fidelity",
        include_prompt: str = "auto",
        template: str | None = None,
        task_description: str | None = None,
        dimension_description: str | None = None,
        system_prompt: str | None = None,
        prob: str = "yes_no",
        yes_words: Sequence[str] = ("Yes", " Yes"),
        no_words: Sequence[str] = ("No", " No"),
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
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        top_logprobs: int = 20,
        **base_kwargs,
    ):
        super().__init__(**base_kwargs)
        choices = {
            "mode": (mode, ("pointwise", "pairwise")),
            "compare_to": (compare_to, ("draft", "reference")),
            "include_prompt": (include_prompt, ("auto", "always", "never")),
            "prob": (prob, ("yes_no", "softmax")),
            "backend": (backend, ("local", "server")),
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
            if dim not in DIMENSIONS and not dimension_description:
                raise ValueError(
                    f"vlm_judge: unknown `dimension: {dim}`; known: {', '.join(DIMENSIONS)} (or set `dimension_description`)"
                )
        if template is not None:
            check_template(template)
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
        self.required_fields = (compare_to,) if mode == "pairwise" else ()

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
            self.yes_ids, self.no_ids = (
                self.vlm.single_token_ids(self.yes_words),
                self.vlm.single_token_ids(self.no_words),
            )
            if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
                raise ValueError(
                    f"vlm_judge: the tokenizer of {model_name_or_path} has no single-token id for some of "
                    f"yes_words={self.yes_words} / no_words={self.no_words} (or they overlap); set words it encodes as one token"
                )
        else:
            if not base_url:
                raise ValueError("vlm_judge: `backend: server` needs `base_url`, e.g. http://localhost:8000/v1")
            self.top_logprobs_n = int(top_logprobs)
            self.client = ChatClient(
                base_url,
                model=model,
                api_key=os.environ.get(api_key_env),
                timeout=timeout,
                max_retries=max_retries,
                backoff=backoff,
                max_concurrency=max_concurrency,
            )

    def to(self, device: str | torch.device) -> VLMJudge:
        super().to(device)
        if self.backend == "local":  # the model is shared by judges with the same settings: they all move
            self.vlm.model.to(self.device)
            self.vlm.device = self.device
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
            dimension_description=self.dimension_description,
        )

    def conversations(self, prompt: str, sample: Any, other: Any = None) -> list[list[dict]]:
        """The chats asked for one sample: per dimension, (A, B) then, with ``both_orders``, (B, A)."""
        sample = to_pil(sample)
        other = to_pil(other) if self.mode == "pairwise" else None
        orders = (
            [[sample]]
            if other is None
            else ([[sample, other], [other, sample]] if self.both_orders else [[sample, other]])
        )
        return [
            build_conversation(self.query(dim, prompt), images, self.system_prompt)
            for dim in self.dimensions
            for images in orders
        ]

    def p_yes(self, conversations: Sequence[list[dict]]) -> list[float | None]:
        """P(Yes) of each chat from the configured backend; ``None`` where it failed."""
        if not conversations:
            return []
        if self.backend == "local":
            try:
                logits = self.vlm.next_token_logits(conversations, self.batch_size)
            except Exception:  # a bad batch must not stop training; the trainer counts the None
                logger.warning("vlm_judge: local forward failed for %d questions", len(conversations), exc_info=True)
                return [None] * len(conversations)
            return [float(p) for p in p_yes_from_logits(logits, self.yes_ids, self.no_ids, self.prob)]

        def ask(conv):
            top = self.client.top_logprobs(to_openai_messages(conv), self.top_logprobs_n)
            return None if top is None else p_yes_from_top_logprobs(top, self.yes_words, self.no_words, self.prob)

        return self.client.map(ask, list(conversations))

    # -- the reward ---------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], completions: Sequence[Any], **columns) -> list[float | None]:
        others: Sequence[Any] = [None] * len(completions)
        if self.mode == "pairwise":
            if columns.get(self.compare_to) is None:
                raise ValueError(
                    f"vlm_judge (mode: pairwise, compare_to: {self.compare_to}) needs the `{self.compare_to}` column; "
                    f"got: {', '.join(sorted(columns)) or 'none'}. Use `mode: pointwise` to judge the sample alone."
                )
            others = [column_value(columns, self.compare_to, i) for i in range(len(completions))]
        per_sample = len(self.dimensions) * (2 if self.both_orders else 1)
        chats: list[list[dict]] = []
        owner: list[int] = []
        for i, (prompt, sample, other) in enumerate(zip(prompts, completions, others)):
            if sample is None or (self.mode == "pairwise" and other is None):
                continue
            try:
                convs = self.conversations(prompt, sample, other)
            except Exception as err:  # noqa: BLE001 - an unreadable image scores None
                logger.warning("vlm_judge: cannot read the images of sample %d (%s)", i, err)
                continue
            chats += convs
            owner += [i] * len(convs)
        probs = self.p_yes(chats)
        by_sample: dict[int, list[float | None]] = {}
        for i, p in zip(owner, probs):
            by_sample.setdefault(i, []).append(p)
        scores: list[float | None] = []
        for i in range(len(completions)):
            ps = by_sample.get(i)
            if ps is None or len(ps) != per_sample or any(p is None for p in ps):
                scores.append(None)
                continue
            if self.both_orders:  # chats come as (A, B), (B, A) per dimension
                ps = [(ps[k] + 1.0 - ps[k + 1]) / 2.0 for k in range(0, len(ps), 2)]
            scores.append(sum(ps) / len(ps))
        return scores
