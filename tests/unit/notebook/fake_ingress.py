"""A tiny real HTTP server on 127.0.0.1 that stands in for the app's ingress.

GET /healthz reports the model and its running replicas (or answers 503, as
the app does when Serve's controller is slow, while
``FakeServer.healthz_unavailable`` counts down), POST /generate echoes
a completion and, as the app does, the generation_kwargs it used (the
server's defaults for those left out), a prompt of "bad" gets a 400
with an OpenAI-style JSON error, a prompt of "crash" gets a 500 whose body
is plain text, not JSON, and one of "hold" is answered only once the test sets
``FakeServer.release``.

With ``"stream": true``, POST /generate answers server-sent events the way the
app does (chunked, each event written in two pieces split mid-line), and so
does POST /v1/chat/completions with chat.completion.chunk events. A prompt (or
last chat message) of "bad" or "crash" is refused before the stream starts,
one of "fail-midway" (or "time-out-midway") sends one piece of text and then
the error event the app sends for a failure (or for ``REQUEST_TIMEOUT_S``),
and one of "empty" streams no text at all.

The notebook helpers' tests talk to it through the real ``LLMClient``.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers.api.errors import error_body
from helpers.config import ServeConfig

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
MODEL_ID = "fake-org/tiny-model"
RUNNING_REPLICAS = 2
CRASH_TEXT = "Internal Server Error: the replica fell over"
BAD_BODY = {"error": {"message": "prompt is bad", "param": "prompt"}}
UNAVAILABLE_BODY = {
    "error": {
        "message": "Serve's controller did not answer: TimeoutError()",
        "type": "service_unavailable",
        "param": None,
        "code": None,
    }
}
DEFAULTS = ServeConfig.from_env({})
USED_BY_DEFAULT = {
    "max_new_tokens": DEFAULTS.max_new_tokens,
    "temperature": DEFAULTS.temperature,
    "top_p": DEFAULTS.top_p,
}
"""What the app's /generate reports it used for knobs a request left out."""
STREAM_PIECES = ["Once", " upon", " a time,", " naïve ☃", "\nthe end."]
MIDWAY_ERRORS = {
    "fail-midway": error_body(500, "internal error: the stream ended early"),
    "time-out-midway": error_body(408, "the model did not finish within 1 s (REQUEST_TIMEOUT_S)"),
}
MIDWAY_ERROR = MIDWAY_ERRORS["fail-midway"]


@dataclass
class FakeServer:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    healthz_calls: int = 0
    healthz_unavailable: int = 0
    """How many of the next /healthz requests get a 503 with ``UNAVAILABLE_BODY``."""
    handshake: threading.Semaphore | None = None
    """When set, the server waits after each streamed piece until the client takes it."""
    acknowledged: list[bool] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    """Lets every request whose prompt is "hold" be answered."""


def _pieces_for(prompt: str) -> list[str]:
    """What the fake model streams: one piece before failing midway, or nothing."""
    if prompt in MIDWAY_ERRORS:
        return STREAM_PIECES[:1]
    return [] if prompt == "empty" else STREAM_PIECES


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streams, as uvicorn sends them

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _write_chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _start_stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()

        def _event(self, data: str) -> None:
            """One event, written as two chunks split mid-line."""
            raw = f"data: {data}\n\n".encode()
            middle = len(raw) // 2
            self._write_chunk(raw[:middle])
            self._write_chunk(raw[middle:])

        def _text_event(self, payload: dict[str, Any]) -> None:
            self._event(json.dumps(payload))
            if state.handshake is not None:
                state.acknowledged.append(state.handshake.acquire(timeout=2))

        def _end_stream(self) -> None:
            self._write_chunk(b"")

        def do_GET(self) -> None:
            if self.path == "/healthz":
                state.healthz_calls += 1
                if state.healthz_unavailable:
                    state.healthz_unavailable -= 1
                    self._send_json(503, UNAVAILABLE_BODY)
                    return
                self._send_json(
                    200,
                    {
                        "status": "ok",
                        "model": MODEL_ID,
                        "model_replicas": {"running": RUNNING_REPLICAS, "starting": 1},
                    },
                )
            else:
                self._send_json(404, {"error": {"message": "not found", "param": None}})

        def do_POST(self) -> None:
            if self.path not in ("/generate", "/v1/chat/completions"):
                self._send_json(404, {"error": {"message": "not found", "param": None}})
                return
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            state.paths.append(self.path)
            state.received.append(body)
            state.authorizations.append(self.headers.get("Authorization"))
            if self.path == "/generate":
                prompt = body.get("prompt")
            else:
                prompt = body["messages"][-1]["content"] if body.get("messages") else ""
            if prompt == "bad":
                self._send_json(400, BAD_BODY)
            elif prompt == "crash":
                self._send(500, CRASH_TEXT.encode(), "text/plain")
            elif prompt == "hold" and not state.release.wait(timeout=60):
                self._send_json(504, {"error": {"message": "never released", "param": None}})
            elif self.path == "/v1/chat/completions":
                self._stream_chat(prompt)
            elif body.get("stream"):
                self._stream_generate(prompt)
            else:
                sent = body.get("generation_kwargs", {})
                self._send_json(
                    200,
                    {
                        "model": MODEL_ID,
                        "prompts": [prompt],
                        "completions": [f"echo: {prompt}"],
                        "generation_kwargs": {**USED_BY_DEFAULT, **sent},
                    },
                )

        def _stream_generate(self, prompt: str) -> None:
            self._start_stream()
            pieces = _pieces_for(prompt)
            for piece in pieces:
                self._text_event({"index": 0, "text": piece})
            if prompt in MIDWAY_ERRORS:
                self._event(json.dumps(MIDWAY_ERRORS[prompt]))
            else:
                final = {
                    "index": 0,
                    "text": "",
                    "finish_reason": "length",
                    "completion_tokens": len(pieces),
                }
                self._event(json.dumps(final))
                self._event("[DONE]")
            self._end_stream()

        def _stream_chat(self, prompt: str) -> None:
            header = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL_ID,
            }

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**header, "choices": [choice]}

            self._start_stream()
            self._event(json.dumps(chunk({"role": "assistant", "content": ""})))
            pieces = _pieces_for(prompt)
            for piece in pieces:
                self._text_event(chunk({"content": piece}))
            if prompt in MIDWAY_ERRORS:
                self._event(json.dumps(MIDWAY_ERRORS[prompt]))
            else:
                self._event(json.dumps(chunk({}, "length")))
                usage = {
                    "prompt_tokens": 3,
                    "completion_tokens": 5,
                    "total_tokens": 8,
                    "prompt_tokens_details": {"cached_tokens": 2},
                }
                self._event(json.dumps({**header, "choices": [], "usage": usage}))
                self._event("[DONE]")
            self._end_stream()

    return Handler


@contextmanager
def fake_ingress() -> Iterator[FakeServer]:
    """The server, listening on a free loopback port until the block ends."""
    state = FakeServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    state.url = f"http://{host}:{port}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state.release.set()  # no handler thread is left waiting
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just freed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
