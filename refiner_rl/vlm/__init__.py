"""Vision-language models for the project's users (the ``vlm_judge`` reward, a judge trainer, the planner).

- :mod:`refiner_rl.vlm.local`: :class:`LocalVLM`, a frozen transformers VLM: next-token logits of a batch of
  chats, greedy answers (:meth:`LocalVLM.generate`);
- :mod:`refiner_rl.vlm.client`: :class:`ChatClient`, an OpenAI-compatible chat-completions client (httpx) whose
  wait on a bad server is bounded (:class:`ServerSettings`, :func:`worst_case_seconds`);
- :mod:`refiner_rl.vlm.questions`: the judge's yes/no question, the chat around it, P(Yes) from logits or
  ``top_logprobs``;
- :mod:`refiner_rl.vlm.pixels`: Qwen2-VL image inputs built in torch, differentiable in the pixels;
- :mod:`refiner_rl.vlm.server`: a small OpenAI-compatible server over a :class:`LocalVLM`
  (``python -m refiner_rl.vlm.server``), for a quick local judge and for tests over real HTTP.
"""

from refiner_rl.vlm.client import ChatClient, ServerSettings, request_seconds, worst_case_seconds
from refiner_rl.vlm.local import LocalVLM
from refiner_rl.vlm.questions import (
    DIMENSIONS,
    TASKS,
    answer_token_ids,
    build_conversation,
    build_query,
    log_p_yes_no,
    p_yes_from_logits,
    p_yes_from_top_logprobs,
    to_openai_messages,
)

__all__ = [
    "DIMENSIONS",
    "TASKS",
    "ChatClient",
    "LocalVLM",
    "ServerSettings",
    "answer_token_ids",
    "build_conversation",
    "build_query",
    "log_p_yes_no",
    "p_yes_from_logits",
    "p_yes_from_top_logprobs",
    "request_seconds",
    "to_openai_messages",
    "worst_case_seconds",
]
