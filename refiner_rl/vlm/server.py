"""A minimal OpenAI-compatible chat-completions server for a local transformers VLM.

For a quick local judge, and for tests of :class:`refiner_rl.vlm.client.ChatClient` (the ``vlm_judge`` server
backend) over real HTTP. For scale, serve the judge with vLLM or SGLang instead; both speak the same protocol::

    python -m refiner_rl.vlm.server --model /path/to/Qwen2.5-VL-7B-Instruct --port 8000
    # recipe: backend: server, base_url: http://127.0.0.1:8000/v1

Endpoints: ``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions`` with text and
``image_url`` parts (base64 data URLs only: the server never fetches a URL). Decoding is greedy
(``temperature`` is ignored). With ``logprobs: true`` each generated token comes with its log-probability
and its ``top_logprobs`` most likely alternatives. Requests are answered one forward at a time.

``top_logprobs`` may go up to the vocabulary size (vLLM caps it at 20 by default).

A completion that raises :class:`Unavailable` is answered 503 (a client retries it), one that raises
:class:`BadRequest` 400 (not retried), any other failure 500.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the server cannot answer as written (HTTP 400)."""


class Unavailable(RuntimeError):
    """A completion the server cannot give now (HTTP 503: worth a retry)."""


def decode_data_url(url: str):
    """A PIL RGB image from a ``data:image/...;base64,...`` URL."""
    from PIL import Image

    if not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("image_url must be a base64 data URL (data:image/png;base64,...); this server fetches nothing")
    return Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))).convert("RGB")


def to_conversation(messages: Any) -> list[dict]:
    """OpenAI chat messages -> transformers chat format with decoded PIL images."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    conversation = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadRequest("each message needs `content`: a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                url = part.get("image_url")
                parts.append(
                    {
                        "type": "image",
                        "image": decode_data_url(url.get("url", "") if isinstance(url, dict) else str(url)),
                    }
                )
            else:
                raise BadRequest(f"unsupported content part type {kind!r}; use text or image_url")
        conversation.append({"role": str(message.get("role", "user")), "content": parts})
    return conversation


class JudgeServer:
    """``ThreadingHTTPServer`` around a :class:`refiner_rl.vlm.local.LocalVLM`.

    ``port=0`` picks a free port (see :attr:`url`). ``requests`` records ``(path, Authorization header)``
    of every request, ``chat_requests`` counts chat-completion requests (before authorization and completion).
    """

    def __init__(
        self,
        vlm,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str = "local-vlm",
        api_key: str | None = None,
        max_top_logprobs: int | None = None,
    ):
        self.vlm, self.served_model_name, self.api_key = vlm, served_model_name, api_key
        self.max_top_logprobs = max_top_logprobs or len(vlm.tokenizer)
        self.requests: list[tuple[str, str | None]] = []
        self.chat_requests = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> JudgeServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()  # tells handlers still completing that the server is going away
        if self._thread is not None:  # shutdown() waits for serve_forever, so only call it when serving
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> JudgeServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    # -- the completion -----------------------------------------------------------------------------
    def _token_entry(self, token_id: int, logprob: float) -> dict:
        text = self.vlm.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprob_content(self, step_logits: torch.Tensor, token_id: int, top_n: int) -> dict:
        logprobs = step_logits.float().log_softmax(-1)
        entry = self._token_entry(token_id, float(logprobs[token_id]))
        values, ids = logprobs.topk(min(top_n, logprobs.numel())) if top_n else (logprobs[:0], logprobs[:0].long())
        entry["top_logprobs"] = [self._token_entry(int(i), float(v)) for v, i in zip(values, ids)]
        return entry

    def complete(self, body: dict) -> dict:
        conversation = to_conversation(body.get("messages"))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        want_logprobs = bool(body.get("logprobs"))
        top_n = int(body.get("top_logprobs") or 0)
        if max_tokens < 1 or not 0 <= top_n <= self.max_top_logprobs:
            raise BadRequest(f"need max_tokens >= 1 and 0 <= top_logprobs <= {self.max_top_logprobs}")
        vlm = self.vlm
        inputs = vlm.encode([conversation])
        if max_tokens == 1:  # the judge's case: the same forward as the local backend
            steps = vlm.last_logits(inputs)
            token_ids = [int(steps[0].argmax())]
        else:
            (token_ids,), (steps,) = vlm.generate_ids(inputs, max_tokens)
        eos = vlm.tokenizer.eos_token_id
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": vlm.tokenizer.decode(token_ids, skip_special_tokens=True)},
            "logprobs": {"content": [self._logprob_content(steps[k], t, top_n) for k, t in enumerate(token_ids)]}
            if want_logprobs
            else None,
            "finish_reason": "stop" if token_ids and token_ids[-1] == eos else "length",
        }
        prompt_tokens = int(inputs["input_ids"].shape[1])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(token_ids),
                "total_tokens": prompt_tokens + len(token_ids),
            },
        }


def _make_handler(server: JudgeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; never prints headers
            logger.debug("vlm_server: " + fmt, *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def _authorized(self) -> bool:
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                self._error(401, "invalid or missing API key", "authentication_error")
                return False
            return True

        def do_GET(self):
            server.requests.append((self.path, self.headers.get("Authorization")))
            if self.path.rstrip("/") == "/health":
                return self._send(200, {"status": "ok"})
            if not self._authorized():
                return None
            if self.path.rstrip("/") == "/v1/models":
                return self._send(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {"id": server.served_model_name, "object": "model", "created": 0, "owned_by": "refiner-rl"}
                        ],
                    },
                )
            return self._error(404, f"no route {self.path}")

        def do_POST(self):
            server.requests.append((self.path, self.headers.get("Authorization")))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            with server._count_lock:
                server.chat_requests += 1
            if not self._authorized():
                return None
            try:
                reply = server.complete(json.loads(body or b"{}"))
            except Unavailable as err:
                return self._error(503, str(err), "server_error")
            except (BadRequest, ValueError, TypeError, KeyError) as err:
                return self._error(400, str(err))
            except Exception as err:
                logger.exception("vlm_server: completion failed")
                return self._error(500, f"{type(err).__name__}: {err}", "server_error")
            return self._send(200, reply)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refiner_rl.vlm.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local folder (or hub id, if online) of a transformers VLM")
    parser.add_argument("--served-model-name", default=None, help="name in /v1/models and replies (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--min-pixels", type=int, default=None)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from refiner_rl.vlm.local import LocalVLM

    vlm = LocalVLM(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        trust_remote_code=args.trust_remote_code,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    server = JudgeServer(
        vlm,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key,
    )
    logger.info("serving %s at %s/v1", server.served_model_name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
