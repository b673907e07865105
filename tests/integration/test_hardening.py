"""Bad input, an API key, backpressure, timeouts and faults, on a real local
Ray cluster with the embedded model, through real HTTP.

The app runs with ``API_KEY`` set and small limits: one model replica that
takes 2 requests at once and queues 2 more. Tests run in file order; the last
ones redeploy the app to provoke timeouts and failures.
"""

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai
import pytest
import ray
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from ray.util.state import list_actors
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.deploy import run_app
from helpers.notebook.polling import wait_for
from helpers.serve.model_errors import RETRY_AFTER_S
from helpers.serve.model_server import LLMServer

from . import breakable_server
from .conftest import BASE_URL, batch_stats, gen, model_replicas_running

KEY = "hardening-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 65536
CAPACITY = 2 + 2  # MAX_ONGOING_REQUESTS + MAX_QUEUED_REQUESTS, one replica
COUNTING = "Count from one to one hundred: one, two, three, four,"
SETTINGS = {
    "API_KEY": KEY,
    "MIN_REPLICAS": "1",
    "MAX_REPLICAS": "1",
    "MAX_NEW_TOKENS": "16",
    "MAX_PROMPTS": "4",
    "MAX_BODY_BYTES": str(MAX_BODY),
    "MAX_ONGOING_REQUESTS": "2",
    "MAX_QUEUED_REQUESTS": "2",
    "REQUEST_TIMEOUT_S": "120",
}


@pytest.fixture(scope="module")
def test_config() -> ServeConfig:
    return ServeConfig.from_env({**os.environ, **SETTINGS})


@pytest.fixture(scope="module")
def model(deployed_app: ServeConfig) -> str:
    return deployed_app.model_id


def send(method: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return requests.request(method, f"{BASE_URL}{path}", headers=headers, timeout=120, **kwargs)


def answered_normally() -> bool:
    body = {"prompt": "Hi", "generation_kwargs": {"max_new_tokens": 1}}
    return send("POST", "/generate", json=body).status_code == 200


def assert_clean_error(response: requests.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    if param is not None:
        assert error["param"] == param
        assert param.split(".")[-1] in error["message"]
    for leak in ("Traceback", 'File "', "/helpers/", ".py", "site-packages"):
        assert leak not in response.text
    assert len(response.content) < 2000  # no copy of a large input


def raw(text: str) -> dict[str, Any]:
    return {"data": text.encode(), "headers": {"Content-Type": "application/json"}}


MODEL = "embedded:SmolLM2-135M-Instruct"
LONG = "word " * 9000


def v1(**fields: Any) -> dict[str, Any]:
    return {"json": {"model": MODEL, "prompt": "a", "max_tokens": 2, **fields}}


def chat(**fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "a"}]
    return {"json": {"model": MODEL, "messages": messages, "max_tokens": 2, **fields}}


MAX_TOKENS = "generation_kwargs.max_new_tokens"
TEMPERATURE = "generation_kwargs.temperature"
TOP_P = "generation_kwargs.top_p"

# (id, method, path, request keyword arguments, status, param named in the error)
BAD_INPUT = [
    ("non-JSON", "POST", "/generate", raw("{not json"), 400, None),
    ("form body", "POST", "/generate", {"data": {"prompt": "a"}}, 415, "Content-Type"),
    (
        "text/plain",
        "POST",
        "/generate",
        {"data": b"{}", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
    ),
    ("empty body", "POST", "/generate", raw(""), 400, None),
    ("neither prompt", "POST", "/generate", {"json": {"generation_kwargs": {}}}, 400, "prompt"),
    (
        "both prompts",
        "POST",
        "/generate",
        {"json": {"prompt": "a", "prompts": ["b"]}},
        400,
        "prompt",
    ),
    ("empty prompt", "POST", "/generate", {"json": {"prompt": ""}}, 400, "prompt"),
    ("empty list", "POST", "/generate", {"json": {"prompts": []}}, 400, "prompts"),
    ("non-string item", "POST", "/generate", {"json": {"prompts": ["a", 7]}}, 400, "prompts.1"),
    ("nested list", "POST", "/generate", {"json": {"prompts": [["a"]]}}, 400, "prompts.0"),
    ("too many prompts", "POST", "/generate", {"json": {"prompts": ["a"] * 5}}, 400, "prompts"),
    ("over the context", "POST", "/generate", {"json": {"prompt": LONG}}, 400, "prompt"),
    (
        "prompts over the context",
        "POST",
        "/generate",
        {"json": {"prompts": ["a", LONG]}},
        400,
        "prompts",
    ),
    ("max_new_tokens 0", "POST", "/generate", {"json": gen(max_new_tokens=0)}, 400, MAX_TOKENS),
    ("max_new_tokens -1", "POST", "/generate", {"json": gen(max_new_tokens=-1)}, 400, MAX_TOKENS),
    ("max_new_tokens 1.5", "POST", "/generate", {"json": gen(max_new_tokens=1.5)}, 400, MAX_TOKENS),
    (
        "max_new_tokens '10'",
        "POST",
        "/generate",
        {"json": gen(max_new_tokens="10")},
        400,
        MAX_TOKENS,
    ),
    (
        "max_new_tokens true",
        "POST",
        "/generate",
        {"json": gen(max_new_tokens=True)},
        400,
        MAX_TOKENS,
    ),
    ("max_new_tokens 17", "POST", "/generate", {"json": gen(max_new_tokens=17)}, 400, MAX_TOKENS),
    ("temperature -0.1", "POST", "/generate", {"json": gen(temperature=-0.1)}, 400, TEMPERATURE),
    ("temperature 2.1", "POST", "/generate", {"json": gen(temperature=2.1)}, 400, TEMPERATURE),
    (
        "temperature NaN",
        "POST",
        "/generate",
        raw('{"prompt": "a", "generation_kwargs": {"temperature": NaN}}'),
        400,
        TEMPERATURE,
    ),
    (
        "temperature Infinity",
        "POST",
        "/generate",
        raw('{"prompt": "a", "generation_kwargs": {"temperature": Infinity}}'),
        400,
        TEMPERATURE,
    ),
    ("top_p 0", "POST", "/generate", {"json": gen(top_p=0)}, 400, TOP_P),
    ("top_p -0.1", "POST", "/generate", {"json": gen(top_p=-0.1)}, 400, TOP_P),
    ("top_p 1.01", "POST", "/generate", {"json": gen(top_p=1.01)}, 400, TOP_P),
    *[
        (key, "POST", "/generate", {"json": gen(**{key: 1})}, 400, f"generation_kwargs.{key}")
        for key in ("num_beams", "trust_remote_code", "custom_generate", "max_length")
    ],
    *[
        (
            f"{key} {value!r}",
            "POST",
            "/generate",
            {"json": gen(**{key: value})},
            400,
            f"generation_kwargs.{key}{where[0] if where else ''}",
        )
        # Each control's ranges are in tests/unit/api/test_sampling_controls.py;
        # here, one of each kind of refusal, the replica's vocabulary check included.
        for key, value, *where in (
            ("top_k", -2),
            ("repetition_penalty", 0),
            ("logit_bias", {"one": 1}),
            ("logit_bias", {"5": 500}, ".5"),
            ("logit_bias", {"49152": 1}),  # past the embedded vocabulary: the replica says so
            ("stop_token_ids", [49152]),
        )
    ],
    ("v1 top_k 1.5", "POST", "/v1/completions", v1(top_k=1.5), 400, "top_k"),
    (
        "v1 logit_bias off vocab",
        "POST",
        "/v1/completions",
        v1(logit_bias={"99999": 1}),
        400,
        "logit_bias",
    ),
    (
        "chat stop_token_ids off vocab, streamed",
        "POST",
        "/v1/chat/completions",
        chat(stop_token_ids=[49152], stream=True),
        400,
        "stop_token_ids",
    ),
    (
        "unknown top-level key",
        "POST",
        "/generate",
        {"json": {"prompt": "a", "beam": 2}},
        400,
        "beam",
    ),
    ("body too large", "POST", "/generate", {"json": {"prompt": "x" * (MAX_BODY + 1)}}, 413, None),
    ("GET /generate", "GET", "/generate", {}, 405, None),
    ("POST /healthz", "POST", "/healthz", {"json": {}}, 405, None),
    ("no such route", "POST", "/v2/generate", {"json": {}}, 404, None),
    ("v1 no model", "POST", "/v1/completions", {"json": {"prompt": "a"}}, 400, "model"),
    ("v1 unknown model", "POST", "/v1/completions", v1(model="gpt-4o"), 404, "model"),
    ("v1 empty prompt", "POST", "/v1/completions", v1(prompt=""), 400, "prompt"),
    ("v1 token id -1", "POST", "/v1/completions", v1(prompt=[1, -2]), 400, "prompt"),
    ("v1 token id off vocab", "POST", "/v1/completions", v1(prompt=[[1], [49152]]), 400, "prompt"),
    ("v1 mixed prompt list", "POST", "/v1/completions", v1(prompt=["a", 1]), 400, "prompt"),
    ("tokenize no prompt", "POST", "/tokenize", {"json": {"model": MODEL}}, 400, "prompt"),
    (
        "tokenize unknown model",
        "POST",
        "/tokenize",
        {"json": {"model": "x", "prompt": "a"}},
        404,
        "model",
    ),
    (
        "tokenize prompt and messages",
        "POST",
        "/tokenize",
        {"json": {"model": MODEL, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}},
        400,
        "prompt",
    ),
    (
        "detokenize empty",
        "POST",
        "/detokenize",
        {"json": {"model": MODEL, "tokens": []}},
        400,
        "tokens",
    ),
    (
        "detokenize off vocab",
        "POST",
        "/detokenize",
        {"json": {"model": MODEL, "tokens": [1, 49152]}},
        400,
        "tokens",
    ),
    ("GET /tokenize", "GET", "/tokenize", {}, 405, None),
    ("v1 max_tokens 0", "POST", "/v1/completions", v1(max_tokens=0), 400, "max_tokens"),
    ("v1 max_tokens 17", "POST", "/v1/completions", v1(max_tokens=17), 400, "max_tokens"),
    ("v1 max_tokens '2'", "POST", "/v1/completions", v1(max_tokens="2"), 400, "max_tokens"),
    ("v1 temperature 3", "POST", "/v1/completions", v1(temperature=3), 400, "temperature"),
    ("v1 top_p 0", "POST", "/v1/completions", v1(top_p=0), 400, "top_p"),
    ("v1 n 9", "POST", "/v1/completions", v1(n=9), 400, "n"),
    (
        "v1 n past the budget",
        "POST",
        "/v1/completions",
        v1(n=8, max_tokens=16, prompt=["a"] * 3),
        400,
        "n",
    ),
    ("v1 five stops", "POST", "/v1/completions", v1(stop=list("abcde")), 400, "stop"),
    ("v1 best_of", "POST", "/v1/completions", v1(best_of=2), 400, "best_of"),
    ("v1 over the context", "POST", "/v1/completions", v1(prompt=LONG), 400, "prompt"),
    (
        "v1 stream over the context",
        "POST",
        "/v1/completions",
        v1(prompt=LONG, stream=True),
        400,
        "prompt",
    ),
    ("v1 GET completions", "GET", "/v1/completions", {}, 405, None),
    ("chat no messages", "POST", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    (
        "chat bad role",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "function", "content": "x"}]),
        400,
        "messages.0.role",
    ),
    ("chat tools", "POST", "/v1/chat/completions", chat(tools=[]), 400, "tools"),
    (
        "chat tool turn without its call",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages.0.tool_call_id",
    ),
    ("chat legacy functions", "POST", "/v1/chat/completions", chat(functions=[]), 400, "functions"),
    (
        "chat top_logprobs alone",
        "POST",
        "/v1/chat/completions",
        chat(top_logprobs=2),
        400,
        "top_logprobs",
    ),
    (
        "chat top_logprobs 21",
        "POST",
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=21),
        400,
        "top_logprobs",
    ),
    (
        "chat max_completion_tokens 17",
        "POST",
        "/v1/chat/completions",
        chat(max_completion_tokens=17),
        400,
        "max_completion_tokens",
    ),
    (
        "chat stream_options alone",
        "POST",
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        None,
    ),
    (
        "chat body too large",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 1)}]),
        413,
        None,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT],
)
def test_bad_input_gets_a_clean_4xx_then_a_valid_request_is_answered(
    deployed_app: ServeConfig, method: str, path: str, kwargs: dict, status: int, param: str | None
) -> None:
    assert_clean_error(send(method, path, **kwargs), status, param)
    assert answered_normally()


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/generate", {"json": gen(max_new_tokens=1)}),
        ("POST", "/v1/completions", v1()),
        ("POST", "/v1/chat/completions", chat()),
        ("GET", "/v1/models", {}),
    ],
    ids=["generate", "completions", "chat", "models"],
)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-0123456789abc", f"Bearer {KEY}x", KEY],
    ids=["no key", "wrong key", "longer key", "no scheme"],
)
def test_without_the_right_key_every_endpoint_but_healthz_answers_401(
    deployed_app: ServeConfig, method: str, path: str, kwargs: dict, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = requests.request(method, f"{BASE_URL}{path}", headers=headers, timeout=60, **kwargs)
    assert_clean_error(response, 401, "Authorization")
    assert response.headers["www-authenticate"] == "Bearer"
    assert send(method, path, **kwargs).status_code == 200


def test_healthz_needs_no_key(deployed_app: ServeConfig) -> None:
    response = requests.get(f"{BASE_URL}/healthz", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_the_openai_client_with_a_wrong_key_raises_its_authentication_error(model: str) -> None:
    with (
        openai.OpenAI(
            base_url=f"{BASE_URL}/v1", api_key="wrong-key-0123456789", max_retries=0
        ) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.models.list()
    with openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=KEY, max_retries=0) as c:
        assert [m.id for m in c.models.list()] == [model]


def test_twice_the_capacity_gets_fast_503s_for_the_excess_and_200s_for_the_rest(
    deployed_app: ServeConfig,
) -> None:
    """Two long streams fill the replica; then six short requests arrive at
    once: those that fit the queue wait, the rest are refused at once with
    Retry-After."""
    redeploy(MAX_NEW_TOKENS="128")
    body = {"model": deployed_app.model_id, "prompt": COUNTING, "temperature": 0}
    # A hundred tokens each, the end-of-sequence token ignored: the replica
    # stays full until one of these streams ends.
    long = {**body, "max_tokens": 100, "ignore_eos": True}
    seen: list[list[dict | str]] = [[], []]
    finished: list[tuple[int, str | None, bool]] = []
    lock = threading.Lock()

    def one(max_tokens: int) -> None:
        response = send("POST", "/v1/completions", json={**body, "max_tokens": max_tokens})
        # Read as the answer arrives: were both long streams still decoding?
        streams_open = not any("[DONE]" in events for events in seen)
        with lock:
            finished.append(
                (response.status_code, response.headers.get("retry-after"), streams_open)
            )

    with ThreadPoolExecutor(max_workers=2 * CAPACITY) as pool:
        first = [pool.submit(stream_events, long, events) for events in seen]
        wait_for(lambda: all(len(e) >= 2 for e in seen), 60, "the replica to be full")
        rest = [pool.submit(one, 8) for _ in range(2 * CAPACITY - 2)]
        for future in rest:
            future.result(timeout=300)
        assert all(f.result(timeout=300)[-1] == "[DONE]" for f in first)
    statuses = [status for status, _, _ in finished]
    # Two fit the queue; Serve frees a queue slot the moment a replica takes a
    # request, so a third can slip in: refusals are bounded, not exact.
    assert set(statuses) == {200, 503}
    assert statuses.count(200) >= CAPACITY - 2
    assert 1 <= statuses.count(503) <= CAPACITY
    # Every refusal came back while both long streams still held the replica:
    # none waited for a slot.
    assert all(open_ and retry == "2" for status, retry, open_ in finished if status == 503)
    assert answered_normally()
    assert model_replicas_running() == 1


FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_fuzzed_requests_never_get_a_5xx_and_match_the_schema(deployed_app: ServeConfig) -> None:
    """schemathesis generates requests from the app's own OpenAPI document: valid
    ones and near misses, the same ones every run, a bounded number each."""
    schema = schemathesis.openapi.from_url(f"{BASE_URL}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
    }
    for operation in operations:

        @settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            case.call_and_validate(headers=AUTH, timeout=60, checks=FUZZ_CHECKS)

        call()
    assert answered_normally()


# -- faults: these redeploy the app, so they come last ------------------------------------


def redeploy(model_server: type = LLMServer, **settings: str) -> ServeConfig:
    config = ServeConfig.from_env({**os.environ, **SETTINGS, **settings})
    run_app(config, model_server)
    return config


def breakable() -> type:
    """The model deployment with ways to break it, pickled by value (its module says why)."""
    ray.cloudpickle.register_pickle_by_value(breakable_server)
    return breakable_server.BreakableLLMServer


def model_handle() -> Any:
    return serve.get_deployment_handle("LLMServer", app_name=APP_NAME)


def model_replica_names() -> set[str]:
    """Actor names of the live model replicas (a stopped one's name can linger
    in the named-actor list for a while, so ask for live actors)."""
    alive = list_actors(
        filters=[("state", "=", "ALIVE"), ("class_name", "=", f"ServeReplica:{APP_NAME}:LLMServer")]
    )
    return {actor.name for actor in alive}


def stream_events(body: dict[str, Any], events: list[dict | str]) -> list[dict | str]:
    """POST a streamed completion, appending its events to ``events`` as they arrive.

    Tests watch ``events`` to know a request is decoding: asking the replica
    (``batch_stats``) would wait for a free slot when the replica is full.
    """
    with send("POST", "/v1/completions", json={**body, "stream": True}, stream=True) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_a_killed_replica_fails_its_requests_fast_then_is_replaced(
    deployed_app: ServeConfig,
) -> None:
    redeploy(MAX_NEW_TOKENS="128")  # long enough generations that the kill lands mid-way
    body = {"model": deployed_app.model_id, "prompt": COUNTING, "max_tokens": 120, "temperature": 0}
    (victim,) = model_replica_names()
    seen: list[dict | str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        stream: Future = pool.submit(stream_events, body, seen)
        wait_for(lambda: len(seen) >= 2, 60, "the stream to be decoding")
        whole: Future = pool.submit(send, "POST", "/v1/completions", json=body)
        # The whole request joins the batch at the next step; ten steps later it decodes.
        joined = len(seen)
        wait_for(lambda: len(seen) >= joined + 10, 60, "ten more decode steps")
        assert not whole.done()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        events, response = stream.result(timeout=60), whole.result(timeout=60)
    assert_clean_error(response, 503, None)
    assert response.headers["retry-after"] == "2"
    assert "error" in events[-1] and events[-1]["error"]["type"] == "service_unavailable"
    wait_for(lambda: model_replica_names() not in (set(), {victim}), 120, "a new replica")
    # Until Serve's routers learn the old replica is gone, a request may still
    # be sent there and fail fast; it must not take long to heal.
    wait_for(answered_normally, 120, "requests to be answered again")


def test_a_request_in_flight_finishes_while_its_replica_is_replaced(
    deployed_app: ServeConfig,
) -> None:
    body = {"model": deployed_app.model_id, "prompt": COUNTING, "max_tokens": 120, "temperature": 0}
    old = model_replica_names()
    seen: list[dict | str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        stream: Future = pool.submit(stream_events, body, seen)
        wait_for(lambda: len(seen) >= 2, 60, "the stream to be decoding")
        # A new version, so new replicas; the next test holds their decode loop.
        redeploy(breakable(), REQUEST_TIMEOUT_S="3")
        events = stream.result(timeout=120)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert model_replica_names().isdisjoint(old)


def test_a_request_past_the_timeout_gets_408_and_its_generation_stops(
    deployed_app: ServeConfig,
) -> None:
    """The app now runs with REQUEST_TIMEOUT_S=3, on the breakable server.
    Its decode loop is held while both requests wait, so they time out
    however fast the host decodes; released, it drops both generations."""
    before = batch_stats()["cancelled"]
    body = {"model": deployed_app.model_id, "prompt": COUNTING, "max_tokens": 16}
    model_handle().stall_decoding.remote().result(timeout_s=90)
    try:
        assert_clean_error(send("POST", "/v1/completions", json=body), 408, None)
        events = stream_events(body, [])
    finally:
        model_handle().resume_decoding.remote().result(timeout_s=60)
    assert len(events) == 1, events  # the error alone: no token decoded, no [DONE]
    assert events[0]["error"]["type"] == "timeout_error"
    wait_for(
        lambda: batch_stats()["cancelled"] >= before + 2,
        30,
        "both generations to stop",
    )
    assert answered_normally()


def test_a_broken_engine_fails_its_health_check_and_is_replaced(
    deployed_app: ServeConfig,
) -> None:
    redeploy(breakable())
    (broken,) = model_replica_names()
    model_handle().break_the_model.remote().result()
    wait_for(
        lambda: model_replica_names() not in ({broken}, set()) and model_replicas_running() == 1,
        120,
        "the unhealthy replica to be replaced",
    )
    assert answered_normally()


def test_a_replica_whose_decode_loop_stopped_answers_503_until_it_is_replaced(
    deployed_app: ServeConfig,
) -> None:
    """Until Serve's health check replaces it, it refuses every request with a
    503 a client can retry, streamed or not: never a 500, nor a 200 whose
    stream holds the error. (The app runs the breakable server since the
    test before.)"""
    (stopped,) = model_replica_names()
    model_handle().stop_decoding.remote().result(timeout_s=60)
    for stream in (False, True):  # well within the health checks that replace it
        reply = send("POST", "/v1/completions", **v1(prompt="Hi", max_tokens=4, stream=stream))
        assert_clean_error(reply, 503, None)
        assert reply.headers["retry-after"] == str(RETRY_AFTER_S)
        assert reply.json()["error"]["type"] == "service_unavailable"
    wait_for(
        lambda: model_replica_names() not in ({stopped}, set()) and model_replicas_running() == 1,
        120,
        "the stopped replica to be replaced",
    )
    assert answered_normally()


def test_a_model_that_cannot_load_fails_the_deploy_with_a_clear_message(
    deployed_app: ServeConfig,
) -> None:
    with pytest.raises(RuntimeError) as caught:
        redeploy(MODEL_ID="/nonexistent/model-dir")
    message = str(caught.value)
    assert "failed to start 2 times" in message  # bounded retries, then a verdict
    assert "ModelLoadError: MODEL_ID='/nonexistent/model-dir' cannot be loaded" in message
    assert "Traceback" not in message


def test_a_request_to_a_model_that_cannot_load_gets_a_503_not_a_hang(
    deployed_app: ServeConfig,
) -> None:
    serve.delete(APP_NAME)
    redeploy(MODEL_ID="/nonexistent/model-dir", MIN_REPLICAS="0")  # nothing to start yet
    response = send("POST", "/generate", json={"prompt": "Hi"})
    assert_clean_error(response, 503, None)
    assert "failed to start" in response.json()["error"]["message"]
