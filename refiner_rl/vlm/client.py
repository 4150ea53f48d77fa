"""An OpenAI-compatible chat-completions client (httpx, asyncio) whose wait on a bad server is bounded.

Talks to vLLM, SGLang or :mod:`refiner_rl.vlm.server`: ``GET {base}/v1/models`` and
``POST {base}/v1/chat/completions``. Used by the ``vlm_judge`` reward's server backend and by anything else that
asks a served VLM (a judge trainer, the planner).

How long a call can wait (``S`` = :class:`ServerSettings`):

- One attempt of a request takes at most ``S.timeout`` seconds, the whole request (connect, send, answer): a
  hard cap around httpx's own per-phase timeouts.
- Timeouts, connection errors, 408, 429 and 5xx are retried, at most ``S.max_retries`` times, after
  ``S.backoff * 2**(k - 1)`` seconds before retry ``k``; other 4xx and replies that are not JSON are not. So one
  request takes at most ``request_seconds(S) = (max_retries + 1) * timeout + backoff * (2**max_retries - 1)``.
- A request that still fails marks its server *down* for ``S.down_for`` seconds: no request goes to a down
  server (every question returns ``None`` at once), and requests waiting to retry give up. This state is shared
  by every client of the same base URL in the process (several judges on one server pay once).
- The served model (``GET /v1/models`` when ``model`` is not set) is looked up once per base URL; a failed
  lookup marks the server down too.
- The questions of one :meth:`ChatClient.chat_many` call run concurrently, at most ``S.max_concurrency`` at a
  time. Against a dead server the first wave fails together and marks the server down before it frees its
  slots, so the queued questions return at once: the call waits for one lookup and one request at most.
- ``S.deadline`` caps every call whatever the server does (one that answers some requests slowly): questions
  still pending when it passes are cancelled and return ``None``.

Hence :func:`worst_case_seconds`, the bound a call is given::

    worst_case_seconds(S) = min(S.deadline, lookup + request_seconds(S)),  lookup = 0 if model is set else request_seconds(S)

At the defaults (timeout 10 s, 1 retry, backoff 1 s, deadline 45 s): ``min(45, 21 + 21) = 42`` seconds per call,
i.e. per rollout for the judge, under a minute.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from refiner_rl.scoring import loop

logger = logging.getLogger(__name__)

RETRY_STATUS = {408, 429}  # plus every 5xx


@dataclass(frozen=True)
class ServerSettings:
    """Timeouts and limits of a :class:`ChatClient` (seconds); see the module docstring for what they bound."""

    timeout: float = 10.0
    max_retries: int = 1
    backoff: float = 1.0
    max_concurrency: int = 8
    down_for: float = 60.0
    deadline: float = 45.0

    def __post_init__(self):
        for key in ("timeout", "deadline"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"`{key}` must be a number of seconds > 0, got {getattr(self, key)!r}")
        for key in ("backoff", "down_for"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"`{key}` must be a number of seconds >= 0, got {getattr(self, key)!r}")
        if int(self.max_retries) < 0 or int(self.max_concurrency) < 1:
            raise ValueError(
                f"need max_retries >= 0 and max_concurrency >= 1, got {self.max_retries!r} and {self.max_concurrency!r}"
            )


def request_seconds(settings: ServerSettings) -> float:
    """Longest one request can take: every attempt times out and every back-off is waited."""
    r = int(settings.max_retries)
    return (r + 1) * float(settings.timeout) + float(settings.backoff) * (2**r - 1)


def worst_case_seconds(settings: ServerSettings, model_known: bool = False) -> float:
    """Longest one :meth:`ChatClient.chat_many` call can wait (formula in the module docstring)."""
    lookup = 0.0 if model_known else request_seconds(settings)
    return min(float(settings.deadline), lookup + request_seconds(settings))


class _ServerState:
    """What the process knows about one server: its model, and until when it is left alone."""

    def __init__(self):
        self.model: str | None = None
        self.down_until = 0.0
        self.reason = ""
        self._lock = threading.Lock()
        self._lookup_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def mark_down(self, seconds: float, reason: str) -> bool:
        """Leave the server alone for ``seconds``; ``True`` if it was up until now."""
        with self._lock:
            was_up = not self.is_down()
            self.down_until = max(self.down_until, time.monotonic() + seconds)
            self.reason = reason
            return was_up

    def lookup_lock(self) -> asyncio.Lock:
        """One model lookup at a time (a lock per event loop: asyncio locks belong to one loop)."""
        with self._lock:
            running = asyncio.get_running_loop()
            if running not in self._lookup_locks:
                self._lookup_locks[running] = asyncio.Lock()
            return self._lookup_locks[running]


_SERVERS: dict[str, _ServerState] = {}
_SERVERS_LOCK = threading.Lock()


def server_state(api_url: str) -> _ServerState:
    with _SERVERS_LOCK:
        return _SERVERS.setdefault(api_url, _ServerState())


def forget_servers() -> None:
    """Forget every server's model and down state (e.g. after restarting servers on the same ports)."""
    with _SERVERS_LOCK:
        _SERVERS.clear()


def api_url(base_url: str) -> str:
    """``{base}/v1`` from ``http(s)://host:port`` with or without ``/v1``."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"`base_url: {base_url}` must start with http:// or https://")
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def first_token_top_logprobs(reply: dict | None) -> list[dict] | None:
    """``choices[0].logprobs.content[0].top_logprobs`` of a chat-completions reply, or ``None``."""
    try:
        return reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"] if reply else None
    except (KeyError, IndexError, TypeError):
        return None


class ChatClient:
    """Chat completions from one OpenAI-compatible server; ``None`` for every question it could not answer.

    ``model``: the served model's name (default: the first of ``/v1/models``, asked once). ``api_key`` is sent as
    ``Authorization: Bearer`` and never logged.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        settings: ServerSettings | None = None,
    ):
        self.api_url = api_url(base_url)
        self.model, self._api_key = model, api_key or None
        self.settings = settings or ServerSettings()
        self.state = server_state(self.api_url)

    def __repr__(self) -> str:
        return f"ChatClient({self.api_url!r}, model={self.model!r}, settings={self.settings})"

    def worst_case_seconds(self) -> float:
        return worst_case_seconds(self.settings, model_known=self.model is not None)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _give_up(self, reason: str) -> None:
        if self.state.mark_down(self.settings.down_for, reason):
            logger.warning(
                "VLM server %s marked down for %g s (no request goes to it until then): %s",
                self.api_url,
                self.settings.down_for,
                self._redact(reason),
            )

    async def request(self, http: httpx.AsyncClient, path: str, body: dict | None = None) -> tuple[Any, str]:
        """GET (no body) or POST JSON to ``{api_url}{path}`` with the retries above: ``(parsed reply, "")`` or
        ``(None, why)``."""
        s, url = self.settings, self.api_url + path
        reason = ""
        for attempt in range(int(s.max_retries) + 1):
            if self.state.is_down():
                return None, f"server marked down ({self.state.reason})"
            if attempt:
                await asyncio.sleep(float(s.backoff) * 2 ** (attempt - 1))
                if self.state.is_down():
                    return None, f"server marked down ({self.state.reason})"
            try:
                call = http.post(url, json=body) if body is not None else http.get(url)
                resp = await asyncio.wait_for(call, float(s.timeout))
            except (asyncio.TimeoutError, httpx.TimeoutException):
                reason = f"timed out after {s.timeout:g} s"
                continue
            except httpx.TransportError as err:  # refused, reset, cut connections
                reason = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code in RETRY_STATUS or resp.status_code >= 500:
                reason = f"HTTP {resp.status_code} {resp.text[:300]!r}"
                continue
            if resp.status_code >= 400:
                return None, f"HTTP {resp.status_code} {resp.text[:300]!r}; not retried"
            try:
                return resp.json(), ""
            except ValueError as err:
                return None, f"reply is not JSON ({err})"
        self._give_up(f"{url} failed {int(s.max_retries) + 1} times, last: {reason}")
        return None, reason

    async def served_model(self, http: httpx.AsyncClient) -> str | None:
        """``model`` if given, else the server's first listed model (looked up once per server)."""
        if self.model is not None:
            return self.model
        async with self.state.lookup_lock():
            if self.state.model is None and not self.state.is_down():
                listing, why = await self.request(http, "/models")
                try:
                    self.state.model = str(listing["data"][0]["id"])
                except (KeyError, IndexError, TypeError):
                    self._give_up(f"{self.api_url}/models lists no model ({why or 'empty list'}); set `model`")
            return self.state.model

    async def chat_many(self, bodies: Sequence[dict], deadline: float | None = None) -> list[dict | None]:
        """POST every chat-completions body (``model`` is filled in); the replies, ``None`` where none came.

        Waits at most :meth:`worst_case_seconds` (or ``deadline``, if smaller). Problems are logged once per call.
        """
        n, s = len(bodies), self.settings
        replies: list[dict | None] = [None] * n
        if n == 0:
            return replies
        budget = self.worst_case_seconds() if deadline is None else min(float(deadline), self.worst_case_seconds())
        problems: list[str] = []
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx.Limits(max_connections=int(s.max_concurrency), max_keepalive_connections=int(s.max_concurrency))
        slots = asyncio.Semaphore(int(s.max_concurrency))

        async def one(http: httpx.AsyncClient, i: int, body: dict) -> None:
            async with slots:
                replies[i], why = await self.request(http, "/chat/completions", body)
            if why:
                problems.append(why)

        async def run(http: httpx.AsyncClient) -> None:
            model = await self.served_model(http)
            if model is None:
                problems.append(f"no model ({self.state.reason})")
                return
            await asyncio.gather(*(one(http, i, {**body, "model": model}) for i, body in enumerate(bodies)))

        async with httpx.AsyncClient(timeout=float(s.timeout), headers=headers, limits=limits) as http:
            try:
                await asyncio.wait_for(run(http), budget)
            except asyncio.TimeoutError:
                problems.append(f"the call's deadline of {budget:g} s passed")
                if all(r is None for r in replies):  # nothing answered in the whole budget: leave it alone
                    self._give_up(f"no answer from {self.api_url} within {budget:g} s")
        missing = sum(r is None for r in replies)
        if missing:
            logger.warning(
                "VLM server %s: %d of %d requests got no answer (%s)",
                self.api_url,
                missing,
                n,
                self._redact(problems[-1] if problems else "unknown error"),
            )
        return replies

    def chat_many_sync(self, bodies: Sequence[dict], deadline: float | None = None) -> list[dict | None]:
        """:meth:`chat_many` from sync code (on the process's background event loop)."""
        return loop.run(self.chat_many(bodies, deadline))
