"""Unit tests for helpers.notebook.client against a tiny real HTTP server on
127.0.0.1 (``fake_ingress``), which answers as the app's ingress does."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest
import requests

from helpers.notebook.client import ApiError, LLMClient, Reply, generate_body, sse_events
from tests.unit.notebook.fake_ingress import (
    BAD_BODY,
    CRASH_TEXT,
    MIDWAY_ERROR,
    MODEL_ID,
    RUNNING_REPLICAS,
    STREAM_PIECES,
    UNAVAILABLE_BODY,
    USED_BY_DEFAULT,
    FakeServer,
)

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
        "model": MODEL_ID,
        "model_replicas": {"running": RUNNING_REPLICAS, "starting": 1},
    }
    assert server.healthz_calls == 1


def test_running_model_replicas_is_an_int(server: FakeServer) -> None:
    running = LLMClient(server.url).running_model_replicas()
    assert running == RUNNING_REPLICAS
    assert type(running) is int


def test_healthz_raises_api_error_with_the_json_body_on_404(server: FakeServer) -> None:
    client = LLMClient(server.url + "/nothing-here")
    with pytest.raises(ApiError) as caught:
        client.healthz()
    assert caught.value.status == 404
    assert caught.value.body == {"error": {"message": "not found", "param": None}}


def test_healthz_raises_api_error_on_503_and_answers_the_next_poll(server: FakeServer) -> None:
    """Serve's controller too slow to tell: a refusal the caller can tell apart
    by its status, as from every other call, not a ``requests.HTTPError``."""
    server.healthz_unavailable = 1
    client = LLMClient(server.url)
    with pytest.raises(ApiError) as caught:
        client.healthz()
    assert caught.value.status == 503
    assert caught.value.body == UNAVAILABLE_BODY
    assert str(caught.value) == f"HTTP 503: {UNAVAILABLE_BODY['error']['message']}"
    assert client.healthz()["status"] == "ok"


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
    assert reply.generation_kwargs == {**USED_BY_DEFAULT, "top_p": 0.5}, "as the server used"
    assert server.received == [
        {"prompt": "a", "generation_kwargs": {"top_p": 0.5}},
        {"prompt": "b", "generation_kwargs": {}},
    ]


def test_generate_raises_api_error_with_the_json_body_on_400(server: FakeServer) -> None:
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).generate("bad", max_new_tokens=3)
    err = caught.value
    assert err.status == 400
    assert err.body == BAD_BODY
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
    assert LLMClient(server.url).wait_until_up(timeout_s=5) is None
    assert server.healthz_calls == 1  # the first try succeeded: no retry, so no sleep


def test_wait_until_up_raises_after_the_timeout(closed_port_url: str) -> None:
    # How long it waits is wait_for's, checked on a fake clock in test_polling.py.
    with pytest.raises(TimeoutError, match=r"waited 0 s for http://127\.0\.0\.1:\d+/healthz"):
        LLMClient(closed_port_url).wait_until_up(timeout_s=0.2)


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
    assert from_curl["generation_kwargs"] == reply.generation_kwargs
    assert from_curl["completions"] == [reply.text]
    assert from_curl["completions"] == [f"echo: {prompt}"]
    assert server.received[0] == server.received[1]
    assert server.received[0] == generate_body(prompt, max_new_tokens=7, top_p=0.5)


# -- streaming -------------------------------------------------------------------------------


class Collector:
    """An on_text callback that keeps the pieces and when each arrived."""

    def __init__(self, handshake: threading.Semaphore | None = None) -> None:
        self.pieces: list[str] = []
        self.handshake = handshake

    def __call__(self, text: str) -> None:
        self.pieces.append(text)
        if self.handshake is not None:
            self.handshake.release()


def test_model_is_read_from_healthz_once(server: FakeServer) -> None:
    client = LLMClient(server.url)
    assert server.healthz_calls == 0  # not read until asked for
    assert client.model == MODEL_ID
    assert client.model == MODEL_ID
    assert server.healthz_calls == 1


def test_stream_generate_passes_each_piece_in_order(server: FakeServer) -> None:
    on_text = Collector()
    started = time.perf_counter()
    reply = LLMClient(server.url).stream_generate("tell", on_text, max_new_tokens=5)
    elapsed = time.perf_counter() - started
    assert on_text.pieces == STREAM_PIECES  # the empty final event is not a piece
    assert isinstance(reply, Reply)
    assert reply.prompt == "tell"
    assert reply.text == "".join(STREAM_PIECES)
    assert reply.generation_kwargs == {"max_new_tokens": 5}
    assert reply.completion_tokens == len(STREAM_PIECES)  # from the last event
    assert reply.first_text_s is not None
    assert 0 < reply.first_text_s <= reply.latency_s <= elapsed


def test_stream_generate_sends_stream_true(server: FakeServer) -> None:
    LLMClient(server.url).stream_generate("tell", Collector(), temperature=0.0, top_p=0.5)
    assert server.paths == ["/generate"]
    assert server.received == [
        {
            "prompt": "tell",
            "generation_kwargs": {"temperature": 0.0, "top_p": 0.5},
            "stream": True,
        }
    ]


def test_stream_of_no_text_gives_an_empty_reply(server: FakeServer) -> None:
    on_text = Collector()
    reply = LLMClient(server.url).stream_generate("empty", on_text)
    assert on_text.pieces == []
    assert reply.text == ""
    assert reply.first_text_s is None
    assert reply.latency_s > 0


@pytest.mark.parametrize("method", ["stream_generate", "stream_chat"])
def test_pieces_reach_on_text_while_the_stream_is_still_open(
    server: FakeServer, method: str
) -> None:
    # The server sends the next piece only once the client has passed the last
    # one to on_text: a client that read the whole body first would stall it.
    server.handshake = threading.Semaphore(0)
    on_text = Collector(server.handshake)
    client = LLMClient(server.url)
    if method == "stream_generate":
        reply = client.stream_generate("tell", on_text)
    else:
        reply = client.stream_chat([{"role": "user", "content": "tell"}], on_text)
    assert server.acknowledged == [True] * len(STREAM_PIECES)
    assert on_text.pieces == STREAM_PIECES
    assert reply.first_text_s is not None
    assert reply.first_text_s < reply.latency_s


def test_stream_generate_raises_api_error_on_400_before_the_stream(server: FakeServer) -> None:
    on_text = Collector()
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).stream_generate("bad", on_text, max_new_tokens=3)
    err = caught.value
    assert err.status == 400
    assert err.body == BAD_BODY
    assert str(err) == "HTTP 400: prompt is bad"
    assert on_text.pieces == []


def test_stream_generate_wraps_a_non_json_500_body(server: FakeServer) -> None:
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).stream_generate("crash", Collector())
    assert caught.value.status == 500
    assert caught.value.body == {"error": {"message": CRASH_TEXT}}


def test_stream_generate_raises_on_an_error_event_mid_stream(server: FakeServer) -> None:
    on_text = Collector()
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).stream_generate("fail-midway", on_text)
    assert caught.value.body == MIDWAY_ERROR and caught.value.status == 500
    assert str(caught.value) == "HTTP 500: internal error: the stream ended early"
    assert on_text.pieces == STREAM_PIECES[:1]  # what came before the error was shown


@pytest.mark.parametrize("stream", ["stream_generate", "stream_chat"])
def test_a_timeout_mid_stream_is_reported_as_the_408_it_stands_for(
    server: FakeServer, stream: str
) -> None:
    """The response began with 200; the error event says what went wrong."""
    client = LLMClient(server.url)
    prompt: Any = "time-out-midway"
    if stream == "stream_chat":
        prompt = [{"role": "user", "content": prompt}]
    with pytest.raises(ApiError) as caught:
        getattr(client, stream)(prompt, Collector())
    assert caught.value.status == 408
    assert str(caught.value).startswith("HTTP 408: the model did not finish within 1 s")


def test_stream_chat_sends_model_messages_and_only_the_set_knobs(server: FakeServer) -> None:
    client = LLMClient(server.url)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell"},
    ]
    reply = client.stream_chat(messages, Collector(), max_tokens=7, temperature=0.0)
    client.stream_chat(messages[:1], Collector())
    assert server.paths == ["/v1/chat/completions"] * 2
    assert (
        server.received
        == [
            {
                "model": MODEL_ID,
                "messages": messages,
                "stream": True,
                "max_tokens": 7,
                "temperature": 0.0,  # 0 is a value, not "unset"
                "stream_options": {"include_usage": True},
            },
            {
                "model": MODEL_ID,
                "messages": messages[:1],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ]
    )
    assert reply.generation_kwargs == {"max_tokens": 7, "temperature": 0.0}
    assert server.healthz_calls == 1  # the model id is asked for once


def test_stream_chat_returns_the_assistant_text(server: FakeServer) -> None:
    on_text = Collector()
    messages = [{"role": "user", "content": "tell"}]
    reply = LLMClient(server.url).stream_chat(messages, on_text, top_p=0.5)
    # The opening role chunk, the finish chunk and the usage chunk carry no text.
    assert on_text.pieces == STREAM_PIECES
    assert reply.text == "".join(STREAM_PIECES)
    assert reply.completion_tokens == 5  # from the usage chunk
    assert reply.cached_tokens == 2  # so is this
    assert reply.prompt == "tell"
    assert reply.generation_kwargs == {"top_p": 0.5}
    assert reply.first_text_s is not None
    assert 0 < reply.first_text_s <= reply.latency_s


def test_stream_chat_raises_api_error_on_400_before_the_stream(server: FakeServer) -> None:
    on_text = Collector()
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).stream_chat([{"role": "user", "content": "bad"}], on_text)
    assert caught.value.status == 400
    assert caught.value.body == BAD_BODY
    assert str(caught.value) == "HTTP 400: prompt is bad"
    assert on_text.pieces == []


def test_stream_chat_raises_on_an_error_event_mid_stream(server: FakeServer) -> None:
    on_text = Collector()
    with pytest.raises(ApiError) as caught:
        LLMClient(server.url).stream_chat([{"role": "user", "content": "fail-midway"}], on_text)
    assert caught.value.body == MIDWAY_ERROR
    assert str(caught.value).endswith(": internal error: the stream ended early")
    assert on_text.pieces == STREAM_PIECES[:1]


def test_stream_raises_connection_error_when_nothing_listens(closed_port_url: str) -> None:
    on_text = Collector()
    with pytest.raises(requests.ConnectionError):
        LLMClient(closed_port_url).stream_generate("tell", on_text)
    assert on_text.pieces == []


# -- sse_events ------------------------------------------------------------------------------


def test_sse_events_skips_blank_lines_and_comments_and_stops_at_done() -> None:
    lines = iter(
        [
            ": keep-alive comment",
            "",
            'data: {"index": 0, "text": "a"}',
            "",
            "event: message",
            'data: {"index": 0, "text": "b"}',
            "",
            "data: [DONE]",
            'data: {"index": 0, "text": "after done"}',
            "not even read",
        ]
    )
    events = sse_events(lines)
    assert next(events) == {"index": 0, "text": "a"}  # lazy: one event at a time
    assert list(events) == [{"index": 0, "text": "b"}]
    assert next(lines) == 'data: {"index": 0, "text": "after done"}'  # left unread


def test_sse_events_of_a_stream_cut_before_done_raises_after_the_events() -> None:
    received: list[dict[str, Any]] = []
    with pytest.raises(requests.ConnectionError, match=r"\[DONE\]"):
        received.extend(sse_events(["data: {}", "", 'data: {"x": [1]}']))
    assert received == [{}, {"x": [1]}]
    with pytest.raises(requests.ConnectionError):
        list(sse_events([]))


def test_the_api_key_goes_in_a_bearer_header_on_every_call(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEY", "from-the-environment-0123")
    client = LLMClient(server.url)
    client.generate("a")
    client.stream_generate("b", lambda _: None)
    client.stream_chat([{"role": "user", "content": "c"}], lambda _: None)
    assert server.authorizations == ["Bearer from-the-environment-0123"] * 3
    assert "from-the-environment" not in client.curl_command("a")
    assert '"Authorization: Bearer $API_KEY"' in client.curl_command("a")


def test_no_api_key_sends_no_authorization_header(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_KEY", raising=False)
    client = LLMClient(server.url)
    client.generate("a")
    assert server.authorizations == [None]
    assert "Authorization" not in client.curl_command("a")
