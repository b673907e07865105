"""A real multi-node Ray cluster: a head and a worker, each its own `ray start`.

The model deployment asks for a custom resource that only workers have, so its
replica must run on a worker. The test kills that worker (SIGKILL, like a
machine lost), sees the cluster and the app report it, joins a new worker and
sees the replica come back there, with a request sent during the outage
answered rather than lost.

Runs before ``test_hardening.py`` starts the session's in-process cluster (file
order), since both would use port 8000 and the dashboard's 8265.
"""

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests

from helpers.config import APP_NAME
from helpers.notebook.client import LLMClient
from helpers.notebook.multinode import (
    HEAD_IP,
    LocalCluster,
    alive_nodes,
    local_cluster,
    replica_nodes,
)
from helpers.notebook.polling import wait_for
from helpers.serve.model_calls import MODEL_DEPLOYMENT

from .conftest import http_up, interrupt, start

MODEL_RESOURCE = {"llm_node": 1}
APP_ENV = {
    "MIN_REPLICAS": "1",
    "MAX_REPLICAS": "1",
    "RESOURCES_PER_REPLICA": json.dumps(MODEL_RESOURCE),
}
START_TIMEOUT_S = 240
NODE_DEATH_TIMEOUT_S = 90


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    assert not ray.is_initialized(), "this test needs port 8000 before the in-process cluster"
    with local_cluster() as running:
        yield running


@pytest.fixture
def served(cluster: LocalCluster) -> Iterator[subprocess.Popen[str]]:
    """`RAY_ADDRESS=<head> serve run ...`, the walkthrough's deploy onto a cluster."""
    started: list[subprocess.Popen[str]] = []
    env = {**APP_ENV, "RAY_ADDRESS": cluster.address}
    try:
        yield start(started, "serve", "run", "ray_serve_app:deployment_graph", env=env)
    finally:
        for process in started:
            if process.poll() is None:
                interrupt(process)


def ask(client: LLMClient) -> str:
    return client.generate("Name a colour.", max_new_tokens=8, temperature=0.0).text


def every_proxy_routes_the_app(client: LLMClient) -> bool:
    """Whether twenty new connections in a row reach a Serve proxy that routes
    the app. Every node here runs a proxy on 127.0.0.1:8000 (one machine;
    Ray binds it with SO_REUSEPORT), and the kernel spreads new connections
    among them: a proxy that has just started on a new worker answers 404
    until the controller has sent it the app's routes."""
    try:
        return all(
            APP_NAME in requests.get(f"{client.base_url}/-/routes", timeout=5).json().values()
            for _ in range(20)
        )
    except (requests.RequestException, ValueError, AttributeError):
        return False


def test_multinode_model_replica_moves_to_a_new_worker_when_its_worker_dies(
    cluster: LocalCluster, served: subprocess.Popen[str]
) -> None:
    first = cluster.add_worker(num_cpus=1, resources=MODEL_RESOURCE)
    assert sorted(alive_nodes().values()) == [HEAD_IP, first.ip]

    wait_for(http_up, START_TIMEOUT_S, "serve run on the cluster to answer /healthz")
    client = LLMClient(timeout_s=START_TIMEOUT_S)
    assert ask(client).strip()
    assert replica_nodes(MODEL_DEPLOYMENT) == [first.ip], "the replica runs where its resource is"

    first.kill()
    wait_for(
        lambda: first.ip not in alive_nodes().values(),
        NODE_DEATH_TIMEOUT_S,
        "the cluster to mark the killed worker dead",
    )
    wait_for(
        lambda: client.running_model_replicas() == 0,
        NODE_DEATH_TIMEOUT_S,
        "the app's /healthz to report no running model replica",
    )
    assert replica_nodes(MODEL_DEPLOYMENT) == []

    with ThreadPoolExecutor(max_workers=1) as pool:
        during_outage = pool.submit(ask, client)
        second = cluster.add_worker(num_cpus=1, resources=MODEL_RESOURCE)
        assert during_outage.result(timeout=START_TIMEOUT_S).strip()

    assert replica_nodes(MODEL_DEPLOYMENT) == [second.ip]
    assert client.running_model_replicas() == 1
    wait_for(
        lambda: every_proxy_routes_the_app(client),
        START_TIMEOUT_S,
        "the new worker's Serve proxy to route the app",
    )
    assert ask(client).strip()
    assert requests.get(f"{client.base_url}/healthz", timeout=10).ok
