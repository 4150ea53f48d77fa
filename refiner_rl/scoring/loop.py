"""One background event loop for the async rewards of a process (TRL runs its async reward functions the same way).

Sync code (the trainer, :func:`refiner_rl.scoring.batch.score_batch`, the sync ``score`` of an async reward)
hands a coroutine to :func:`run` and blocks until it is done. The loop lives on a daemon thread, started on first
use; coroutines of one :func:`run` call run concurrently with each other (``asyncio.gather`` inside), and calls
from several threads share the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's background event loop (started on a daemon thread on first call)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="refiner-rl-rewards-loop", daemon=True).start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and return its result (its exception is raised here).

    Must not be called from a coroutine already running on that loop (it would wait on itself)."""
    loop = background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("refiner_rl.scoring.loop.run() called from the rewards loop itself; `await` instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()
