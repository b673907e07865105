"""Unit tests for helpers.client against a tiny real HTTP server on 127.0.0.1.

The server stands in for the app's ingress: GET /healthz reports running model
replicas, POST /generate echoes a completion and the generation_kwargs it got,
a prompt of "bad" gets a 400 with an OpenAI-style JSON error, and a prompt of
"crash" gets a 500 whose body is plain text, not JSON.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from helpers.client import ApiError, LLMClient, Reply, generate_body

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
RUNNING_REPLICAS = 2
CRASH_TEXT = "Internal Server Error: the replica fell over"


@dataclass
class FakeServer:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    healthz_calls: int = 0


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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

        def do_GET(self) -> None:
            if self.path == "/healthz":
                state.healthz_calls += 1
                self._send_json(
                    200,
                    {
                        "status": "ok",
                        "model_replicas": {"running": RUNNING_REPLICAS, "starting": 1},
                    },
                )
            else:
                self._send_json(404, {"error": {"message": "not found", "param": None}})

        def do_POST(self) -> None:
            if self.path != "/generate":
                self._send_json(404, {"error": {"message": "not found", "param": None}})
                return
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            state.received.append(body)
            prompt = body.get("prompt")
            if prompt == "bad":
                self._send_json(400, {"error": {"message": "prompt is bad", "param": "prompt"}})
            elif prompt == "crash":
                self._send(500, CRASH_TEXT.encode(), "text/plain")
            else:
                self._send_json(
                    200,
                    {
                        "completions": [f"echo: {prompt}"],
                        "generation_kwargs": body.get("generation_kwargs", {}),
                    },
                )

    return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
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
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just freed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- generate_body ---------------------------------------------------------------------------


def test_generate_body_drops_unset_knobs() -> None:
    assert generate_body("hi") == {"prompt": "hi", "generation_kwargs": {}}
    assert generate_body("hi", temperature=0.0, top_p=None) == {
        "prompt": "hi",
        "generation_kwargs": {"temperature": 0.0},  # 0 is a value, not "unset"
    }
    assert generate_body("hi", max_new_tokens=8, temperature=0.5, top_p=0.9) == {
        "prompt": "hi",
        "generation_kwargs": {"max_new_tokens": 8, "temperature": 0.5, "top_p": 0.9},
    }


# -- LLMClient -------------------------------------------------------------------------------


def test_base_url_trailing_slash_is_dropped(server: FakeServer) -> None:
    client = LLMClient(server.url + "/")
    assert client.base_url == server.url
    assert client.healthz()["status"] == "ok"


def test_healthz_returns_the_json(server: FakeServer) -> None:
    health = LLMClient(server.url).healthz()
    assert health == {
        "status": "ok",
        "model_replicas": {"running": RUNNING_REPLICAS, "starting": 1},
    }
    assert server.healthz_calls == 1


def test_running_model_replicas_is_an_int(server: FakeServer) -> None:
    running = LLMClient(server.url).running_model_replicas()
    assert running == RUNNING_REPLICAS
    assert type(running) is int


def test_healthz_raises_on_http_error(server: FakeServer) -> None:
    client = LLMClient(server.url + "/nothing-here")
    with pytest.raises(requests.HTTPError):
        client.healthz()


def test_generate_returns_a_reply(server: FakeServer) -> None:
    reply = LLMClient(server.url).generate("hello", max_new_tokens=5, temperature=0.2, top_p=0.8)
    assert isinstance(reply, Reply)
    assert reply.prompt == "hello"
    assert reply.text == "echo: hello"
    assert reply.generation_kwargs == {"max_new_tokens": 5, "temperature": 0.2, "top_p": 0.8}
    assert reply.latency_s > 0
    assert server.received == [
        {
            "prompt": "hello",
            "generation_kwargs": {"max_new_tokens": 5, "temperature": 0.2, "top_p": 0.8},
        }
    ]


def test_generate_sends_only_the_knobs_that_are_set(server: FakeServer) -> None:
    client = LLMClient(server.url)
    reply = client.generate("a", temperature=None, top_p=0.5)
    client.generate("b")
    assert reply.generation_kwargs == {"top_p": 0.5}
    assert server.received == [
        {"prompt": "a", "generation_kwargs": {"top_p": 0.5}},
        {"prompt": "b", "generation_kwargs": {}},
    ]


def test_generate_raises_api_error_with_the_json_body_on_400(server: FakeServer) -> None:
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).generate("bad", max_new_tokens=3)
    err = caught.value
    assert err.status == 400
    assert err.body == {"error": {"message": "prompt is bad", "param": "prompt"}}
    assert str(err) == "HTTP 400: prompt is bad"
    assert isinstance(err, RuntimeError)


def test_generate_wraps_a_non_json_500_body(server: FakeServer) -> None:
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).generate("crash")
    err = caught.value
    assert err.status == 500
    assert err.body == {"error": {"message": CRASH_TEXT}}
    assert str(err) == f"HTTP 500: {CRASH_TEXT}"


def test_api_error_message_falls_back_to_the_body() -> None:
    err = ApiError(422, {"detail": "nope"})
    assert err.status == 422
    assert str(err) == "HTTP 422: {'detail': 'nope'}"


def test_wait_until_up_returns_when_the_server_answers(server: FakeServer) -> None:
    started = time.monotonic()
    assert LLMClient(server.url).wait_until_up(timeout_s=5) is None
    assert time.monotonic() - started < 2  # first try succeeded: no 1 s sleep
    assert server.healthz_calls == 1


def test_wait_until_up_raises_after_the_timeout(closed_port_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        LLMClient(closed_port_url).wait_until_up(timeout_s=0.2)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 5


def test_curl_command_shape() -> None:
    command = LLMClient("http://127.0.0.1:9/").curl_command("it's", max_new_tokens=4)
    lines = command.split("\n")
    assert lines[0] == "curl http://127.0.0.1:9/generate \\"
    assert lines[1] == "  -H 'Content-Type: application/json' \\"
    assert lines[2].startswith("  -d ")
    assert len(lines) == 3


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not on PATH")
def test_curl_command_gets_the_same_json_as_the_client(server: FakeServer) -> None:
    client = LLMClient(server.url)
    # A quote in the prompt checks the shell quoting of the body.
    prompt = 'it\'s a "test" $HOME'
    command = client.curl_command(prompt, max_new_tokens=7, top_p=0.5)
    result = subprocess.run(
        ["bash", "-c", command + " --silent --show-error"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    from_curl = json.loads(result.stdout)

    reply = client.generate(prompt, max_new_tokens=7, top_p=0.5)
    assert from_curl == {"completions": [reply.text], "generation_kwargs": reply.generation_kwargs}
    assert from_curl["completions"] == [f"echo: {prompt}"]
    assert server.received[0] == server.received[1]
    assert server.received[0] == generate_body(prompt, max_new_tokens=7, top_p=0.5)
