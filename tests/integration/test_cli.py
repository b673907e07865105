"""The walkthrough's commands, run as a user runs them, in subprocesses.

These tests run before the in-process cluster of ``test_serving.py`` starts
(file order), because each brings up and tears down a cluster of its own.
"""

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
import requests

from helpers.config import APP_NAME
from helpers.notebook.cluster import (
    HEAD_ARGS,
    cli_path,
    cluster_running,
    ray_command,
    serve_command,
    stop_cluster,
)
from helpers.notebook.polling import wait_for
from helpers.serve.config_file import CONFIG_PATH, render, serve_config
from tests.shell import unsourced_env

from .conftest import (
    BASE_URL,
    IDLE_TIMEOUT_S,
    REPO,
    http_up,
    interrupt,
    model_replicas_running,
    process_title,
    ray_listeners_off_loopback,
    ready_spare_pid,
    start,
)

bare = unsourced_env()

START_TIMEOUT_S = 240
TEARDOWN_TIMEOUT_S = 30
"""How long a stopped cluster's processes may take to go, once the command that stopped it ended."""


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; interrupted like Ctrl-C, then killed if need be."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    if cluster_running():
        stop_cluster()


def ask_for_a_haiku() -> str:
    body = {
        "prompt": "Write a haiku about Ray Serve.",
        "generation_kwargs": {"max_new_tokens": 16, "temperature": 0.6, "top_p": 0.95},
    }
    response = requests.post(f"{BASE_URL}/generate", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()["completions"][0]


def test_make_serve_closed_with_its_terminal_stops_its_cluster(background: list) -> None:
    """A closed terminal hangs up the whole process group, the cluster's
    daemons included: the teardown must not wait on a driver that needs them."""
    assert not cluster_running()
    server = start(background, "scripts/serve.sh")
    wait_for(http_up, START_TIMEOUT_S, "make serve to answer /healthz")
    os.killpg(server.pid, signal.SIGHUP)
    server.wait(timeout=TEARDOWN_TIMEOUT_S + 30)  # raises while the teardown hangs
    wait_for(lambda: not cluster_running(), TEARDOWN_TIMEOUT_S, "make serve's cluster to stop")


def test_serve_run_without_a_cluster_starts_one_and_names_the_app(background: list) -> None:
    """From a shell that sourced nothing: the kit's ``serve`` applies the
    loopback and token settings itself."""
    assert not cluster_running(), "a Ray cluster is already running on this machine"
    server = start(background, "serve", "run", "ray_serve_app:deployment_graph", base=bare)
    wait_for(http_up, START_TIMEOUT_S, "serve run to answer /healthz")
    assert APP_NAME in serve_command("status").stdout
    assert ask_for_a_haiku().strip()
    assert ray_listeners_off_loopback() == []
    interrupt(server)
    assert not http_up()


def test_make_serve_names_a_bad_variable_before_it_starts_anything() -> None:
    assert not cluster_running()
    run = subprocess.run(
        ["scripts/serve.sh"],
        cwd=REPO,
        env={**bare, "MAX_REPLICAS": "two"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("make serve: ") and "MAX_REPLICAS='two'" in run.stderr
    assert "Stopping" not in run.stdout and "Traceback" not in run.stderr
    assert not cluster_running()


def test_make_serve_tears_down_the_cluster_it_started_and_the_spare(background: list) -> None:
    """Ctrl-C: ``serve delete RayServeLLM``, then ``ray stop``; the spare
    process the stopped replica left goes with them."""
    assert not cluster_running()
    idle = {"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)}
    server = start(background, "scripts/serve.sh", env=idle)
    wait_for(http_up, START_TIMEOUT_S, "make serve to answer /healthz")
    assert ask_for_a_haiku().strip()
    assert ray_listeners_off_loopback() == []  # the proxy, the dashboard, the GCS, ...
    wait_for(lambda: model_replicas_running() == 0, IDLE_TIMEOUT_S + 60, "zero replicas")
    spare = ready_spare_pid()
    interrupt(server)
    assert not http_up()
    # The script has exited; what it stopped may take a moment to go.
    wait_for(lambda: not cluster_running(), TEARDOWN_TIMEOUT_S, "make serve's cluster to stop")
    wait_for(lambda: process_title(spare) is None, TEARDOWN_TIMEOUT_S, "the spare to exit")


def test_the_committed_serve_config_is_what_serve_build_gives() -> None:
    assert render(serve_config()) == CONFIG_PATH.read_text(), (
        "deploy/serve_config.yaml drifted: run `python -m helpers.serve.config_file` and commit it"
    )


def test_serve_deploy_then_serve_run_on_a_running_cluster_and_serve_delete(
    background: list,
) -> None:
    """On one cluster started with ``ray start``: ``serve deploy`` of the
    committed config serves; then ``serve run`` deploys the app again (that it
    serves a request, the first test shows), and ``serve delete`` from a shell
    that sourced nothing finds the cluster on 127.0.0.1 and sends its token;
    Ctrl-C on ``serve run`` leaves the cluster it did not start."""
    assert not cluster_running()
    started = ray_command("start", *HEAD_ARGS)
    assert started.returncode == 0, started.stderr
    deployed = serve_command("deploy", str(CONFIG_PATH))
    assert deployed.returncode == 0, deployed.stderr
    wait_for(http_up, START_TIMEOUT_S, "serve deploy to answer /healthz")
    assert ask_for_a_haiku().strip()
    assert APP_NAME in serve_command("status").stdout
    assert serve_command("delete", APP_NAME).returncode == 0
    assert APP_NAME not in serve_command("status").stdout

    server = start(background, "serve", "run", "ray_serve_app:deployment_graph")
    wait_for(http_up, START_TIMEOUT_S, "serve run to answer /healthz")
    assert server.poll() is None, "serve run exited"
    assert APP_NAME in serve_command("status").stdout
    deleted = subprocess.run(
        [cli_path("serve"), "delete", APP_NAME],
        env=bare,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert deleted.returncode == 0, deleted.stderr
    assert APP_NAME not in serve_command("status").stdout
    interrupt(server)
    assert cluster_running(), "serve run must leave a cluster it did not start running"
    assert ray_command("stop").returncode == 0
