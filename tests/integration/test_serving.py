"""The deployed app on a real local Ray cluster, through real HTTP.

Tests run in file order: the last ones watch the model scale to zero, wake it
again, and delete the app with the walkthrough's command.
"""

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import psutil
import pytest
import ray
import requests
from ray import serve

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.polling import wait_for
from helpers.serve import spare_worker
from helpers.serve.app import build_app

from .conftest import (
    BASE_URL,
    IDLE_TIMEOUT_S,
    gen,
    model_replicas_running,
    process_title,
    ray_listeners_off_loopback,
    ready_spare_pid,
)

HAIKU = {
    "prompt": "Write a haiku about Ray Serve.",
    "generation_kwargs": {"max_new_tokens": 24, "temperature": 0.6, "top_p": 0.95},
}


def post_generate(body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{BASE_URL}/generate", json=body, timeout=120, **kwargs)


HEALTHZ_POLLS = 4
HEALTHZ_POLL_GAP_S = 2.0
"""Polled like a load balancer: a /healthz that reached the model deployment
would start a replica, seen starting (or running) by the next poll."""


def healthz() -> dict[str, Any]:
    return requests.get(f"{BASE_URL}/healthz", timeout=10).json()


def test_healthz_answers_without_waking_the_model(deployed_app: ServeConfig) -> None:
    """An app deleted and deployed again at once under the same name can
    start a model replica it inherits from the old one's last moments (seen
    here after the previous module's client disconnect, with or without this
    session's changes); that one is let go first, so the polls begin with the
    model idle at zero."""
    wait_for(
        lambda: not any(healthz()["model_replicas"].values()),
        IDLE_TIMEOUT_S + 60,
        "the model idle at zero replicas",
    )
    start = healthz()["model_start"]
    for poll in range(HEALTHZ_POLLS):
        time.sleep(HEALTHZ_POLL_GAP_S)  # past the ingress's one-second cache of the counts
        health = healthz()
        assert health["status"] == "ok"
        assert health["model"] == deployed_app.model_id
        # No model replica in any state (starting, running, stopping), ...
        assert not any(health["model_replicas"].values()), (poll, health["model_replicas"])
        # ... and none started between two polls.
        assert health["model_start"] == start, poll


def test_every_ray_port_listens_on_loopback_only(deployed_app: ServeConfig) -> None:
    assert ray_listeners_off_loopback() == []


def test_the_walkthrough_request_gets_the_walkthrough_response(deployed_app: ServeConfig) -> None:
    response = post_generate(HAIKU)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "prompts", "completions", "generation_kwargs"}
    assert body["model"] == deployed_app.model_id
    assert body["prompts"] == [HAIKU["prompt"]]
    assert len(body["completions"]) == 1 and body["completions"][0].strip()
    assert body["generation_kwargs"] == HAIKU["generation_kwargs"]


def test_defaults_fill_the_generation_kwargs_actually_used(deployed_app: ServeConfig) -> None:
    body = post_generate({"prompt": "Hi"}).json()
    assert body["generation_kwargs"] == {
        "max_new_tokens": deployed_app.max_new_tokens,
        "temperature": deployed_app.temperature,
        "top_p": deployed_app.top_p,
    }


def test_a_batch_of_prompts_matches_each_prompt_alone(deployed_app: ServeConfig) -> None:
    greedy = {"max_new_tokens": 12, "temperature": 0}
    prompts = ["The capital of France is", "Name a colour.", "Count to three."]
    together = post_generate({"prompts": prompts, "generation_kwargs": greedy}).json()
    alone = [
        post_generate({"prompt": p, "generation_kwargs": greedy}).json()["completions"][0]
        for p in prompts
    ]
    assert together["prompts"] == prompts
    assert together["completions"] == alone


BAD_BODIES = [
    pytest.param({"generation_kwargs": {}}, "prompt", id="missing prompt"),
    pytest.param({"prompt": "a", "prompts": ["b"]}, "prompt", id="both prompt and prompts"),
    pytest.param({"prompt": 42}, "prompt", id="non-string prompt"),
    pytest.param({"prompts": ["a", 3]}, "prompts.1", id="non-string item"),
    pytest.param({"prompt": ""}, "prompt", id="empty prompt"),
    pytest.param({"prompts": []}, "prompts", id="empty prompts"),
    pytest.param({"prompts": ["a"] * 9}, "prompts", id="too many prompts"),
    pytest.param(gen(max_new_tokens=0), "generation_kwargs.max_new_tokens", id="zero tokens"),
    pytest.param(gen(max_new_tokens=65), "generation_kwargs.max_new_tokens", id="over limit"),
    pytest.param(gen(max_new_tokens="10"), "generation_kwargs.max_new_tokens", id="str tokens"),
    pytest.param(gen(temperature=2.5), "generation_kwargs.temperature", id="hot temperature"),
    pytest.param(gen(top_p=0), "generation_kwargs.top_p", id="zero top_p"),
    pytest.param(
        gen(trust_remote_code=True), "generation_kwargs.trust_remote_code", id="trust_remote_code"
    ),
    pytest.param(
        gen(custom_generate="x/y"), "generation_kwargs.custom_generate", id="custom_generate"
    ),
    pytest.param({"prompt": "a", "num_beams": 4}, "num_beams", id="unknown top-level key"),
    pytest.param(["a"], "prompt", id="a list body"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_input_gets_a_4xx_that_names_the_field(
    deployed_app: ServeConfig, body: Any, param: str
) -> None:
    response = post_generate(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[-1] in error["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b'{"prompt": "a", "generation_kwargs": {"temperature": NaN}}', 400),
    ],
    ids=["non-JSON", "empty body", "NaN literal"],
)
def test_unparseable_bodies_get_a_400(deployed_app: ServeConfig, raw: bytes, status: int) -> None:
    response = requests.post(f"{BASE_URL}/generate", data=raw, timeout=30)
    assert response.status_code == status
    assert "error" in response.json()


def test_a_prompt_longer_than_the_context_gets_a_400(deployed_app: ServeConfig) -> None:
    response = post_generate({"prompt": "word " * 9000, "generation_kwargs": {"max_new_tokens": 4}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert len(response.text) < 1000


def test_wrong_methods_get_a_405(deployed_app: ServeConfig) -> None:
    assert requests.get(f"{BASE_URL}/generate", timeout=10).status_code == 405
    assert requests.post(f"{BASE_URL}/healthz", timeout=10).status_code == 405


def test_eight_concurrent_requests_share_batches(deployed_app: ServeConfig) -> None:
    model = serve.get_deployment_handle("LLMServer", app_name=APP_NAME)
    before = model.batch_stats.remote().result()
    body = {"prompt": "Tell me a fact.", "generation_kwargs": {"max_new_tokens": 8}}
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: post_generate(body), range(8)))
    after = model.batch_stats.remote().result()
    assert all(r.status_code == 200 for r in responses)
    assert after["sequences"] - before["sequences"] == 8
    # Eight requests run alone would need eight prefills and a forward pass per token.
    assert after["prefills"] - before["prefills"] < 8
    assert after["forward_passes"] - before["forward_passes"] < (
        after["generated_tokens"] - before["generated_tokens"]
    )


def test_a_replica_reports_where_its_start_went(deployed_app: ServeConfig) -> None:
    """Through /healthz, from the report the replica wrote before it took a
    request: the ingress never asks the replica for it."""
    assert post_generate({"prompt": "Hi", "generation_kwargs": {"max_new_tokens": 2}}).ok
    health = healthz()
    assert health["engine"]["implementation"] == "kit-decoder"
    start = health["model_start"]
    # A spare process's own start is its replica's (process_started is init_started).
    assert start["process_started"] <= start["init_started"] < start["ready"]
    # The engine's parts happen inside __init__, so they fit between its stamps.
    engine = start["engine"]
    parts = ("imports_s", "tokenizer_s", "weights_s", "warm_up_s")
    assert 0 < sum(engine[part] for part in parts) <= start["ready"] - start["init_started"]


def test_the_model_scales_to_zero_while_healthz_is_polled(deployed_app: ServeConfig) -> None:
    assert post_generate({"prompt": "Hi", "generation_kwargs": {"max_new_tokens": 2}}).ok
    last_request = time.monotonic()
    seen = []
    # Poll every second, as a load balancer would; the bound is a safety net,
    # the promise (idle timeout + 15 s) is measured and printed, not asserted.
    for _ in range(IDLE_TIMEOUT_S + 60):
        seen.append(model_replicas_running())
        if seen[-1] == 0:
            break
        time.sleep(1)
    assert seen[-1] == 0, f"model replicas while polling: {seen}"
    print(f"model replica gone {time.monotonic() - last_request:.1f} s after the last request")


GREEDY = {
    "prompt": "Name three colours.",
    "generation_kwargs": {"max_new_tokens": 16, "temperature": 0},
}
REPLICA_TITLE = "ray::ServeReplica:RayServeLLM:LLMServer"
SPARE_EXIT_TIMEOUT_S = 30


def is_model_replica(pid: int) -> bool:
    """Whether Ray calls the process the model's replica. While a call runs,
    Ray adds the method to the title (``...LLMServer.handle_request_with_rejection``),
    and it may not have put the title back when the reply has reached us."""
    return (process_title(pid) or "").split(".", 1)[0] == REPLICA_TITLE


def spare_at_zero() -> int:
    """The ready spare's pid, once the model has scaled to zero."""
    wait_for(lambda: model_replicas_running() == 0, IDLE_TIMEOUT_S + 60, "zero replicas")
    pid = ready_spare_pid()
    assert process_title(pid) == "ray::IDLE"
    return pid


def test_a_request_at_zero_replicas_runs_in_the_spare_and_gets_the_warm_text(
    deployed_app: ServeConfig,
) -> None:
    spare = spare_at_zero()
    # Waiting, it reserves nothing: every CPU of the cluster is free at zero.
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    cold = post_generate(GREEDY)
    assert cold.status_code == 200
    assert model_replicas_running() == 1
    assert is_model_replica(spare)
    warm = post_generate(GREEDY)
    assert cold.json()["completions"][0].strip()
    assert cold.json()["completions"] == warm.json()["completions"]


def test_a_redeploy_with_another_configuration_never_meets_the_old_spare(
    deployed_app: ServeConfig,
) -> None:
    old_spare = spare_at_zero()
    old_key = psutil.Process(old_spare).environ()[spare_worker.KEY_VARIABLE]
    changed = replace(deployed_app, max_new_tokens=deployed_app.max_new_tokens + 1)
    serve.run(build_app(changed), name=APP_NAME, route_prefix="/")
    wait_for(
        lambda: process_title(old_spare) is None, SPARE_EXIT_TIMEOUT_S, "the old spare to exit"
    )
    assert post_generate(GREEDY).status_code == 200
    (replica,) = [p for p in psutil.process_iter() if is_model_replica(p.pid)]
    assert replica.environ()[spare_worker.KEY_VARIABLE] != old_key


def test_serve_delete_removes_the_app(deployed_app: ServeConfig) -> None:
    # Its spare, were one waiting, would exit as the old one did on the
    # redeploy above: the ingress lets go of the key in both cases. With
    # `ray stop`, test_cli.py follows one to its end.
    result = subprocess.run(
        ["serve", "delete", APP_NAME], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert APP_NAME not in serve.status().applications


def test_an_app_deleted_and_deployed_again_shows_no_report_of_the_old_one(
    deployed_app: ServeConfig,
) -> None:
    """A stopping ingress forgets its model's report (Ray's KV store outlives
    the app), so the same configuration deployed again shows none until one
    of its own replicas is ready."""
    serve.run(build_app(deployed_app), name=APP_NAME, route_prefix="/")
    assert post_generate(GREEDY).status_code == 200
    assert healthz()["model_start"] is not None
    serve.delete(APP_NAME)
    deployed_at = time.time()
    serve.run(build_app(deployed_app), name=APP_NAME, route_prefix="/")
    start = healthz()["model_start"]
    assert start is None or start["ready"] > deployed_at, start
