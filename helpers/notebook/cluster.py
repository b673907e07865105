"""Start, join and stop a local Ray cluster the way the walkthrough does.

The notebooks share one cluster: the first starts it with ``ray start --head``
(a separate process, so it outlives any one notebook's kernel), later ones
connect to it, and the last stops it with ``ray stop``. Each notebook can also
run alone, because :func:`connect` starts the cluster when none is running.

Every command runs with :data:`~helpers.ray_env.RAY_ENV`, the same settings
as ``scripts/ray_env.sh``: token authentication on, every port on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from helpers.ray_env import RAY_ENV, apply_ray_env
from helpers.serve.preflight import port_open

DASHBOARD_URL = "http://127.0.0.1:8265"
METRICS_EXPORT_PORT = 8080
"""Where Ray exports its metrics and the kit's, for Prometheus (README); Ray
picks a random port when none is given, which no scrape config could name."""
HEAD_ARGS = ("--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1")


def metrics_export_port() -> int:
    """:data:`METRICS_EXPORT_PORT`, or a free port when something else holds
    it (Colab's own web app listens on 8080): Ray's metrics agent cannot
    share a port, and without it the node does not start."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", METRICS_EXPORT_PORT))
            return METRICS_EXPORT_PORT
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]


def metrics_url() -> str:
    """The local node's metrics endpoint, as the running cluster reports it."""
    import ray

    connect()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    local = [n for n in nodes if n["NodeManagerAddress"] == "127.0.0.1"]
    if not local:
        found = sorted(n["NodeManagerAddress"] for n in nodes)
        raise RuntimeError(
            "no live Ray node at 127.0.0.1, where notebook 01 starts the cluster whose "
            f"metrics this reads; the cluster this process joined has nodes at {found}"
        )
    return f"http://127.0.0.1:{local[0]['MetricsExportPort']}/metrics"


def ray_command(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``ray`` CLI of this Python environment with :data:`RAY_ENV`."""
    return _run_cli("ray", args, timeout_s)


def serve_command(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``serve`` CLI (Ray's, plus ``delete``) with :data:`RAY_ENV`."""
    return _run_cli("serve", args, timeout_s)


def _run_cli(
    name: str, args: tuple[str, ...], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli_path(name), *args],
        env={**os.environ, **RAY_ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def cli_path(name: str) -> str:
    """The `ray` or `serve` CLI beside this Python, so a venv need not be on PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else (shutil.which(name) or name)


def cluster_running() -> bool:
    return ray_command("status", timeout_s=60).returncode == 0


def drop_stale_connection() -> None:
    """``ray.shutdown()`` when this process joined a cluster that has since
    stopped (another notebook ran ``ray stop``): ``ray.is_initialized()``
    still says True, and the next ``serve.status()`` would wait on the dead
    GCS. A GCS that no longer accepts a connection within a second counts as
    stopped."""
    import ray
    import ray.util.client

    # A Ray Client connection (ray://) reaches one port of the head; the
    # GCS address it reports is the head's own, often not reachable here.
    if not ray.is_initialized() or ray.util.client.ray.is_connected():
        return
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    if not port_open(host.strip("[]"), int(port)):
        ray.shutdown()


def ensure_auth_token() -> None:
    """Create ``~/.ray/auth_token`` if missing (Ray 2.60 needs one to start)."""
    ray_command("get-auth-token", "--generate")


def start_cluster() -> bool:
    """``ray start --head`` on loopback unless a cluster runs; True if started here."""
    if cluster_running():
        return False
    ensure_auth_token()
    port = f"--metrics-export-port={metrics_export_port()}"
    result = ray_command("start", *HEAD_ARGS, port, timeout_s=300)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stderr[-2000:]}")
    return True


def connect() -> None:
    """Join the local cluster from this process, starting it first if needed;
    a connection to a cluster that has since stopped is made again."""
    apply_ray_env()
    import ray

    drop_stale_connection()
    if ray.is_initialized():
        return
    start_cluster()
    ray.init(address="auto", namespace="serve", log_to_driver=False)


def stop_cluster() -> None:
    """``ray stop``: ends every Ray process of this machine's local cluster.

    Then ``ray stop --force`` for any process that ignored the SIGTERM: Ray
    2.60's GCS sometimes hangs on it, flushing events to an agent that already
    stopped, and its stale address would make the next ``ray.init()`` wait for
    a dead cluster. When everything stopped, the second command finds nothing.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    result = ray_command("stop", timeout_s=300)
    if result.returncode != 0:
        raise RuntimeError(f"ray stop failed:\n{result.stderr[-2000:]}")
    ray_command("stop", "--force", timeout_s=120)
