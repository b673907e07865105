"""The kit's metrics and request ids on a real deployment: Prometheus's own
endpoint (Ray's metrics-export port) scraped before and after known requests,
and the replica's JSON log read for a request's id.

Tests run in file order; the first one meets the model at zero replicas, so
its cold start is among what it counts.
"""

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest

from helpers.config import ServeConfig
from helpers.notebook.metrics import Scrape, scrape, wait_for_total

from .conftest import BASE_URL, model_replicas_running

COLD_START_PHASES = ("process", "imports", "tokenizer", "weights", "warm_up", "total")


@pytest.fixture(scope="module")
def test_config() -> ServeConfig:
    return ServeConfig.from_env(
        {
            **os.environ,
            "MAX_REPLICAS": "1",
            "MAX_NEW_TOKENS": "16",
            "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "120",
        }
    )


def completion(http: httpx.Client, model: str, **body) -> httpx.Response:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, **body}
    return http.post("/v1/completions", json={"temperature": 0, **body})


def grown(before: Scrape, name: str, by: float, **labels: str) -> float:
    """How much ``name`` grew since ``before``, once it grew by ``by`` (Ray
    reports every few seconds, so a count is waited for, then checked)."""
    start = before.total(name, **labels)
    with_timeout = wait_for_total(name, start + by, timeout_s=60, **labels)
    return with_timeout.total(name, **labels) - start


def test_counters_move_by_exactly_what_was_sent(deployed_app: ServeConfig) -> None:
    model = deployed_app.model_id
    assert model_replicas_running() == 0
    before = scrape()
    with httpx.Client(base_url=BASE_URL, timeout=120) as http:
        whole = [completion(http, model).json() for _ in range(2)]
        streamed = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        refused = [completion(http, model, max_tokens=-1), completion(http, "not-this-model")]
    assert [r.status_code for r in refused] == [400, 404]
    usage = [reply["usage"] for reply in whole]
    usage.append(json.loads(streamed.text.split("data: ")[-2])["usage"])

    requests = "ray_llm_requests_total"
    assert grown(before, requests, 2, endpoint="/v1/completions", outcome="completed") == 2
    assert grown(before, requests, 1, endpoint="/v1/chat/completions", outcome="completed") == 1
    assert grown(before, requests, 2, endpoint="/v1/completions", outcome="client_error") == 2
    errors = "ray_llm_errors_total"
    assert grown(before, errors, 1, status="400", type="invalid_request_error") == 1
    assert grown(before, errors, 1, status="404", type="not_found_error") == 1

    sent = {kind: sum(u[kind] for u in usage) for kind in ("prompt_tokens", "completion_tokens")}
    assert (
        grown(before, "ray_llm_prompt_tokens_total", sent["prompt_tokens"]) == sent["prompt_tokens"]
    )
    assert (
        grown(before, "ray_llm_completion_tokens_total", sent["completion_tokens"])
        == sent["completion_tokens"]
    )
    assert grown(before, "ray_llm_time_to_first_token_seconds_count", 3) == 3
    assert grown(before, "ray_llm_e2e_request_latency_seconds_count", 3) == 3

    assert grown(before, "ray_llm_cold_starts_total", 1) == 1
    for phase in COLD_START_PHASES:
        assert grown(before, "ray_llm_cold_start_seconds_count", 1, phase=phase) == 1


def test_every_response_carries_its_request_id_and_so_does_the_replica_log(
    deployed_app: ServeConfig,
) -> None:
    mine = f"metrics-test-{uuid.uuid4().hex}"
    with httpx.Client(base_url=BASE_URL, timeout=120) as http:
        answered = completion(http, deployed_app.model_id)
        refused = http.post(
            "/v1/completions",
            json={"model": deployed_app.model_id, "prompt": "x", "top_p": 7},
            headers={"x-request-id": f"{mine}-refused"},
        )
        served = http.post(
            "/v1/completions",
            json={"model": deployed_app.model_id, "prompt": "x", "max_tokens": 2},
            headers={"x-request-id": mine},
        )
    assert answered.headers.get("x-request-id")  # Serve made one up
    assert refused.status_code == 400
    assert refused.headers["x-request-id"] == f"{mine}-refused"
    assert refused.json()["error"]["request_id"] == f"{mine}-refused"
    assert served.status_code == 200 and served.headers["x-request-id"] == mine

    logs = Path("/tmp/ray/session_latest/logs/serve").glob("replica_*LLMServer*.log")
    lines = [json.loads(line) for log in logs for line in log.read_text().splitlines() if line]
    about_mine = [line for line in lines if line.get("request_id") == mine]
    assert about_mine, "no JSON line of the model replica's log names the request's id"
