"""A real local Ray cluster, on loopback, shared by the integration tests."""

import ipaddress
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import requests
from ray import serve

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.cluster import metrics_export_port
from helpers.notebook.cold_start import wait_for_spare
from helpers.serve.app import build_app

REPO = Path(__file__).resolve().parents[2]
BASE_URL = "http://127.0.0.1:8000"
IDLE_TIMEOUT_S = 4


def http_up() -> bool:
    try:
        return requests.get(f"{BASE_URL}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def start(
    started: list[subprocess.Popen[str]],
    *command: str,
    env: dict[str, str] | None = None,
    base: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``command`` in its own session, with ``env`` over ``base`` (by
    default this process's environment)."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**(os.environ if base is None else base), **(env or {})},
        start_new_session=True,
        # A shell's background jobs inherit SIGINT ignored, and Python keeps it
        # ignored; restore the default so the interrupt below acts like Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    return process


def interrupt(process: subprocess.Popen[str]) -> int:
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=120)


SERVE_REPLICA_GRPC = "ray::ServeReplica"
"""Ray Serve 2.60 starts an inter-deployment gRPC server in every replica bound
to ``[::]:0`` (hard-coded in ``ray/serve/_private/replica.py``), so those
processes listen on all interfaces at a random port. Nothing here can change
that; the README's security section says to keep the machine's ports closed."""


def ray_listeners_off_loopback() -> list[str]:
    """Listening sockets of Ray's processes bound to anything but loopback,
    except the Serve replicas' inter-deployment gRPC servers.

    Anyone who reaches Ray's dashboard, job API or GCS can run code on the
    cluster, so on one machine every one of them must stay on 127.0.0.1.
    """
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None or _is_loopback(conn.laddr.ip):
            continue
        try:
            process = psutil.Process(conn.pid)
            name, command = process.name(), " ".join(process.cmdline())
        except psutil.Error:
            continue
        wildcard = conn.laddr.ip in ("::", "0.0.0.0")
        if wildcard and name.startswith(SERVE_REPLICA_GRPC):
            continue
        if "ray" in name or "/ray/" in command or "ray::" in command:
            found.append(f"{name}[{conn.pid}] on {conn.laddr.ip}:{conn.laddr.port}")
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def model_replicas_running() -> int:
    return requests.get(f"{BASE_URL}/healthz", timeout=10).json()["model_replicas"]["running"]


def batch_stats() -> dict[str, int]:
    """The model replica's batching counters (``LLMServer.batch_stats``), asked
    through Serve. A call like any other: at zero replicas it wakes the model,
    and on a full replica it waits for a free slot."""
    return serve.get_deployment_handle("LLMServer", app_name=APP_NAME).batch_stats.remote().result()


def gen(**kwargs: Any) -> dict[str, Any]:
    """A one-prompt ``/generate`` body with the given generation_kwargs."""
    return {"prompt": "a", "generation_kwargs": kwargs}


def ready_spare_pid() -> int:
    """The pid of the spare model process, once ``/healthz`` says one waits."""
    spare = wait_for_spare(BASE_URL)
    assert spare["state"] == "ready", spare
    return spare["pid"]


def process_title(pid: int) -> str | None:
    """What Ray calls the process now (``ray::IDLE``, ``ray::ServeReplica:...``),
    or None once it has exited."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).split(maxsplit=1)[0]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
        return None


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    # address="local" always starts a new cluster rather than joining one that
    # happens to run on this machine; it ends with this process.
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_export_port(),
        namespace="serve",
        log_to_driver=False,
    )
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def test_config() -> ServeConfig:
    """The default configuration with a short idle timeout and one replica at most,
    so scale-to-zero happens within a test and batching stays on one replica."""
    return ServeConfig.from_env(
        {
            **os.environ,
            "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
            "MAX_REPLICAS": "1",
            "MAX_NEW_TOKENS": "64",
            "MAX_PROMPTS": "8",
        }
    )


@pytest.fixture(scope="module")
def deployed_app(ray_cluster: None, test_config: ServeConfig) -> Iterator[ServeConfig]:
    serve.run(build_app(test_config), name=APP_NAME, route_prefix="/")
    yield test_config
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
