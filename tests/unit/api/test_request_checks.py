"""The ingress's first checks (API key, content type, size, JSON) and the
mapping of model-call failures, on a tiny FastAPI app driven in-process."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from helpers.api.errors import EXCEPTION_HANDLERS
from helpers.api.request_checks import check_api_key, read_json
from helpers.protocol import PromptTooLongError
from helpers.serve.model_errors import RETRY_AFTER_S, RequestFields, model_error

KEY = "test-key-0123456789abcdef"
LIMIT = 8192
UPLOAD_TIMEOUT_S = 0.2


def make_app(api_key: str) -> FastAPI:
    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)  # type: ignore[arg-type]

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        check_api_key(request, api_key)
        return {"body": await read_json(request, LIMIT, UPLOAD_TIMEOUT_S)}

    return app


def make_client(api_key: str) -> TestClient:
    return TestClient(make_app(api_key))


@pytest.fixture
def open_client() -> TestClient:
    return make_client("")


@pytest.fixture
def keyed_client() -> TestClient:
    return make_client(KEY)


def test_no_key_configured_lets_everyone_in(open_client: TestClient) -> None:
    assert open_client.post("/echo", json={"a": 1}).json() == {"body": {"a": 1}}


@pytest.mark.parametrize(
    "header",
    [None, f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer", "Bearer "],
    ids=["none", "short", "long", "basic", "no scheme", "scheme only", "empty token"],
)
def test_a_missing_or_wrong_key_gets_401(keyed_client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    reply = keyed_client.post("/echo", json={"a": 1}, headers=headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["type"] == "authentication_error" and error["param"] == "Authorization"
    assert KEY not in reply.text


def test_the_right_key_is_accepted_whatever_the_scheme_case(keyed_client: TestClient) -> None:
    for scheme in ("Bearer", "bearer"):
        reply = keyed_client.post(
            "/echo", json={"a": 1}, headers={"Authorization": f"{scheme} {KEY}"}
        )
        assert reply.status_code == 200


def test_the_key_is_checked_before_the_body_is_read(keyed_client: TestClient) -> None:
    reply = keyed_client.post("/echo", content=b"x" * (LIMIT * 4))
    assert reply.status_code == 401


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.api+json", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
    ],
)
def test_only_json_content_types_are_read(
    open_client: TestClient, content_type: str, status: int
) -> None:
    reply = open_client.post("/echo", content=b'{"a": 1}', headers={"Content-Type": content_type})
    assert reply.status_code == status
    if status == 415:
        assert reply.json()["error"]["param"] == "Content-Type"


def test_a_body_without_content_type_is_still_read(open_client: TestClient) -> None:
    bare = open_client.post("/echo", content=b'{"a": 1}')
    assert "content-type" not in bare.request.headers
    assert bare.status_code == 200


def test_a_body_over_the_limit_gets_413_without_an_echo(open_client: TestClient) -> None:
    big = b'{"prompt": "' + b"y" * LIMIT + b'"}'
    reply = open_client.post("/echo", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert "MAX_BODY_BYTES" in reply.json()["error"]["message"]
    assert len(reply.content) < 500


def test_a_chunked_body_over_the_limit_gets_413(open_client: TestClient) -> None:
    def chunks():
        for _ in range(8):
            yield b"z" * (LIMIT // 2)

    reply = open_client.post(
        "/echo", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 413


def half_a_body_then(after: Callable[[], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """What the app sends when a client sends half its body, then ``after()``.
    TestClient always sends the whole body, so this drives the ASGI app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    first_part = {"type": "http.request", "body": b'{"prompt": "hal', "more_body": True}
    pending = [first_part]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else await after()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(make_app("")(scope, receive, send))
    return sent


def test_a_client_gone_mid_body_gets_499_not_a_fault() -> None:
    """A client that hangs up halfway through its body gets 499, as Serve's
    proxy logs a disconnect, and no exception leaves the app: Starlette's
    last-resort handler would answer 500 and re-raise it, and the server
    would log its traceback and count a server error."""

    async def disconnect() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    sent = half_a_body_then(disconnect)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    error = json.loads(sent[1]["body"])["error"]
    assert "body" in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_stops_arriving_gets_408() -> None:
    async def silence() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent = half_a_body_then(silence)
    assert sent[0]["status"] == 408
    assert "REQUEST_TIMEOUT_S" in json.loads(sent[1]["body"])["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"prompt": "a\xed\xa0\x80b"}', "not valid JSON"),  # a surrogate's own bytes
        ('{"prompt": "a\ud800b"}'.encode("utf-16-le", "surrogatepass"), "not valid JSON"),
        (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
        (b'{"n": ' + b"9" * 5000 + b"}", "number too long"),
    ],
)
def test_unreadable_bodies_get_400(open_client: TestClient, raw: bytes, message: str) -> None:
    reply = open_client.post("/echo", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert message in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"prompt": "a\ud800b"}', "prompt"),
        (rb'{"messages": [{"role": "user", "content": "\uDC00"}]}', "messages.0.content"),
        (rb'{"n": 1, "\ud800": 1}', None),
        (rb'"\ud800"', None),
    ],
    ids=["a field", "nested", "a key", "the body"],
)
def test_half_a_utf16_pair_is_refused_where_it_is(
    open_client: TestClient, raw: bytes, param: str | None
) -> None:
    """JSON can escape it, no tokenizer can read it."""
    reply = open_client.post("/echo", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and "half of a UTF-16 pair" in error["message"]


def test_a_whole_utf16_pair_is_text(open_client: TestClient) -> None:
    raw = rb'{"prompt": "\ud83d\ude00 and \u00e9"}'
    reply = open_client.post("/echo", content=raw, headers={"Content-Type": "application/json"})
    assert reply.json() == {"body": {"prompt": "\U0001f600 and \u00e9"}}


@pytest.mark.parametrize(
    ("error", "status", "retry"),
    [
        (PromptTooLongError("too long"), 400, False),
        (TimeoutError(), 408, False),
        (BackPressureError(num_queued_requests=5, max_queued_requests=4), 503, True),
        (ActorDiedError(), 503, True),
    ],
    ids=["too long", "timeout", "queue full", "replica died"],
)
def test_model_failures_map_to_statuses_a_client_can_act_on(
    error: Exception, status: int, retry: bool
) -> None:
    mapped = model_error(error, RequestFields("prompt"), 30)
    assert mapped is not None and mapped.status == status
    assert (mapped.headers or {}).get("Retry-After") == (str(RETRY_AFTER_S) if retry else None)
    assert "Traceback" not in mapped.message


def test_an_unknown_failure_is_left_to_the_500_handler() -> None:
    assert model_error(ValueError("boom"), RequestFields("prompt"), 30) is None
