"""The chat client's bounds: the worst-case formula, and a loopback server that accepts and never answers."""

from __future__ import annotations

import socketserver
import threading
import time

import pytest
import torch

from refiner_rl.rewards.vlm_judge import VLMJudge
from refiner_rl.scoring import score_batch
from refiner_rl.vlm import ChatClient, ServerSettings, request_seconds, worst_case_seconds
from refiner_rl.vlm.client import forget_servers


@pytest.fixture(autouse=True)
def _fresh_server_state():
    forget_servers()
    yield
    forget_servers()


class SilentServer(socketserver.ThreadingTCPServer):
    """Accepts connections, reads the request and never answers. Records each request line and the most
    connections open at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.lines: list[str] = []
        self.open = self.most_open = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _Silent)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def lines_after(self, n: int) -> list[str]:
        """The request lines, once ``n`` have arrived (a handler thread may record one a moment after the client
        gave up on it); waits a few seconds at most."""
        end = time.monotonic() + 10.0
        while len(self.lines) < n and time.monotonic() < end:
            time.sleep(0.01)
        return list(self.lines)

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _Silent(socketserver.BaseRequestHandler):
    def handle(self):
        server: SilentServer = self.server
        with server.lock:
            server.open += 1
            server.most_open = max(server.most_open, server.open)
        try:
            first = self.request.recv(65536).split(b"\r\n", 1)[0].decode("latin-1")
            with server.lock:
                server.lines.append(" ".join(first.split()[:2]))
            self.request.settimeout(0.05)
            while not server.stop.is_set():  # hold the connection open, answer nothing
                try:
                    if not self.request.recv(65536):
                        break
                except TimeoutError:
                    continue
        finally:
            with server.lock:
                server.open -= 1


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def test_worst_case_formula_and_its_value_at_the_defaults():
    s = ServerSettings(timeout=3.0, max_retries=2, backoff=0.5, deadline=100.0)
    assert request_seconds(s) == 3 * 3.0 + 0.5 * (1 + 2)  # three attempts, back-offs 0.5 and 1
    assert worst_case_seconds(s, model_known=True) == 10.5
    assert worst_case_seconds(s) == 21.0  # the model lookup, then one question
    assert worst_case_seconds(ServerSettings(timeout=30.0, deadline=45.0)) == 45.0  # the deadline caps it
    defaults = ServerSettings()
    assert request_seconds(defaults) == 2 * 10.0 + 1.0
    assert worst_case_seconds(defaults) == 42.0 < 60  # one rollout's wait on a dead server, at the defaults
    judge = VLMJudge(backend="server", base_url="http://127.0.0.1:1")  # the reward's defaults are these settings
    assert judge.client.settings == defaults and judge.client.worst_case_seconds() == 42.0
    with pytest.raises(ValueError, match="`deadline` must be a number of seconds > 0"):
        ServerSettings(deadline=0)


def test_a_server_that_never_answers_scores_none_within_the_bound(silent):
    settings = ServerSettings(timeout=0.5, max_retries=1, backoff=0.05, max_concurrency=2, deadline=10.0)
    judge = VLMJudge(
        backend="server",
        base_url=silent.url,
        mode="pointwise",
        dimension=["structure", "aesthetics"],
        **{k: getattr(settings, k) for k in ("timeout", "max_retries", "backoff", "max_concurrency", "deadline")},
    )
    images = [torch.rand(3, 8, 8) for _ in range(3)]
    batch = score_batch([judge], ["a", "b", "c"], images)
    assert torch.isnan(batch.scores).all()
    # no `model`: the lookup is tried max_retries + 1 times, fails, marks the server down; no question is sent
    assert silent.lines_after(2) == ["GET /v1/models"] * 2
    assert judge([""], images[:1]) == [None] and len(silent.lines) == 2  # down: the next rollout sends nothing


def test_questions_run_concurrently_up_to_the_limit_and_a_dead_server_stops_the_queue(silent):
    client = ChatClient(
        silent.url, model="m", settings=ServerSettings(timeout=1.0, max_retries=0, max_concurrency=2, deadline=10.0)
    )
    bodies = [{"messages": [{"role": "user", "content": str(i)}], "max_tokens": 1} for i in range(6)]
    assert client.chat_many_sync(bodies) == [None] * 6
    # the first wave (2 at once) times out and marks the server down before freeing its slots: the 4 queued
    # questions never connect
    assert silent.lines_after(2) == ["POST /v1/chat/completions"] * 2 and silent.most_open == 2


def test_the_deadline_cuts_a_call_short(silent):
    # each attempt may wait 30 s, but the call's deadline is 0.5 s: everything pending becomes None
    client = ChatClient(silent.url, model="m", settings=ServerSettings(timeout=30.0, max_retries=0, deadline=0.5))
    assert client.worst_case_seconds() == 0.5
    assert client.chat_many_sync([{"messages": []}] * 3) == [None] * 3
    assert client.state.is_down()  # nothing answered within the budget: the server is left alone
    sent = len(silent.lines_after(3))
    assert client.chat_many_sync([{"messages": []}]) == [None] and len(silent.lines) == sent
