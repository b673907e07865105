"""A real multi-node Ray cluster on one machine: a head and workers, each its
own ``ray start --block`` process, as on separate machines.

Each node gets its own loopback address (127.0.0.2 for the head, 127.0.0.3
and up for workers), so Ray sees distinct nodes and all traffic stays on this
machine. Two Ray 2.60 rules shape this:

- A worker may join only with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and
  with that set Ray replaces the address ``127.0.0.1`` by the machine's
  network address; other loopback addresses it leaves alone.
- Ray's gRPC servers bind to 127.0.0.1 only when a node's address is exactly
  that, so while a multi-node cluster runs its internal ports listen on all
  interfaces, as they must across real machines. The dashboard and Serve's
  HTTP proxy still bind 127.0.0.1, and the nodes live only as long as the
  notebook or test that started them.

``--block`` keeps each node tied to one process: stopping it (SIGTERM) stops
that node's Ray processes, and killing its process group (SIGKILL) is a
machine losing power.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from helpers.notebook.cluster import (
    DASHBOARD_URL,
    RAY_ENV,
    apply_ray_env,
    cli_path,
    cluster_running,
    drop_stale_connection,
    port_open,
)
from helpers.notebook.polling import wait_for
from helpers.serve.preflight import CLUSTER_PORTS

HEAD_IP = "127.0.0.2"
GCS_PORT = 6379
HEAD_ADDRESS = f"{HEAD_IP}:{GCS_PORT}"
"""What workers pass to ``ray start --address`` and drivers set as RAY_ADDRESS."""

STOP_FIRST = "run stop_cluster() (notebook 06, step 5) first"

MULTINODE_ENV = {**RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass
class RayNode:
    """One Ray node, alive exactly as long as its ``ray start --block`` process."""

    ip: str
    process: subprocess.Popen[bytes]
    log: Path
    ended: bool = field(default=False, init=False)
    """Stopped or killed here: its process id may since name another process."""

    def stop(self) -> None:
        """Stop the node as ``ray stop`` would, by this process's id only, then
        delete its log: it was read only to see the node start. Once is enough."""
        if not self.ended and not self._ended_by_sigterm():
            self.kill()
        self.ended = True
        self.log.unlink(missing_ok=True)

    def _ended_by_sigterm(self) -> bool:
        if self.process.poll() is not None:
            return False  # ended already: the group may hold what it left
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the node's whole process group: no goodbye to the cluster."""
        if self.ended:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)
        self.ended = True


@dataclass
class LocalCluster:
    """A head and its workers on this machine; :meth:`close` stops them all."""

    head: RayNode
    workers: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return HEAD_ADDRESS

    @property
    def running(self) -> bool:
        """Whether the head still runs (``ray stop`` elsewhere ends it too)."""
        return self.head.process.poll() is None

    def add_worker(self, num_cpus: float, resources: Mapping[str, float] | None = None) -> RayNode:
        """Join a worker at the next free loopback address, as
        ``ray start --address=<head>:6379`` does on another machine."""
        ip = f"127.0.0.{3 + len(self.workers)}"
        args = [f"--address={HEAD_ADDRESS}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(dict(resources))}")
        worker = _start_node(ip, args)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        """Stop every node, then forget the head's address as ``ray stop`` does,
        so a later ``ray status`` or ``ray.init()`` does not wait for it; that
        includes the ``RAY_ADDRESS`` :func:`open_cluster` set for it. Closing
        twice is harmless."""
        global _opened
        for node in [*reversed(self.workers), self.head]:
            node.stop()
        from ray._common.utils import get_ray_address_file

        address_file = Path(get_ray_address_file(None))
        if address_file.exists() and address_file.read_text().strip() == HEAD_ADDRESS:
            address_file.unlink()
        if self is _opened:
            _opened = None
            if os.environ.get("RAY_ADDRESS") == self.address:
                del os.environ["RAY_ADDRESS"]


def start_head(num_cpus: float = 1) -> LocalCluster:
    """Start the head node: GCS, dashboard on 127.0.0.1:8265, no workers yet."""
    head = _start_node(
        HEAD_IP,
        ["--head", f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}"],
    )
    return LocalCluster(head)


@contextmanager
def local_cluster(head_cpus: float = 1) -> Iterator[LocalCluster]:
    """A head node that is stopped, with every worker added, on the way out."""
    cluster = start_head(head_cpus)
    try:
        yield cluster
    finally:
        cluster.close()


def _start_node(ip: str, args: list[str]) -> RayNode:
    """``ray start`` for one node, with no GPU: every node here would claim this
    machine's GPUs as its own, so Ray would count each one once per node and
    place more GPU replicas than the GPU holds."""
    with tempfile.NamedTemporaryFile(prefix=f"ray-node-{ip}-", suffix=".log", delete=False) as out:
        process = subprocess.Popen(
            [cli_path("ray"), "start", "--block", f"--node-ip-address={ip}", "--num-gpus=0", *args],
            env={**os.environ, **MULTINODE_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = RayNode(ip, process, Path(out.name))
    try:
        wait_for(
            lambda: _started(node), START_TIMEOUT_S, f"the Ray node at {ip} to start ({node.log})"
        )
    except BaseException:  # a timeout, a failed start, or the user's interrupt
        node.kill()
        raise
    return node


def _started(node: RayNode) -> bool:
    if node.process.poll() is not None:
        raise RuntimeError(f"ray start for {node.ip} exited:\n{node.log.read_text()[-2000:]}")
    return "Ray runtime started" in node.log.read_text(errors="replace")


def _state_api_address() -> str | None:
    """A driver asks its own cluster; anything else asks the local dashboard."""
    import ray

    return None if ray.is_initialized() else DASHBOARD_URL


def alive_nodes() -> dict[str, str]:
    """Node id to node address, for every node the cluster counts as alive."""
    from ray.util.state import list_nodes

    # Filters apply after the limit, so Ray reports the dead nodes as "missing".
    nodes = list_nodes(
        address=_state_api_address(),
        filters=[("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return {node.node_id: node.node_ip for node in nodes}


def describe_nodes() -> list[dict[str, object]]:
    """One row per live node: its address, role and the resources it offers."""
    from ray.util.state import list_nodes

    nodes = list_nodes(
        address=_state_api_address(),
        filters=[("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )
    internal = ("memory", "object_store_memory", "node:")
    return [
        {
            "node": node.node_ip,
            "role": "head" if node.is_head_node else "worker",
            **{k: v for k, v in node.resources_total.items() if not k.startswith(internal)},
        }
        for node in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_ip))
    ]


def replica_nodes(deployment: str) -> list[str]:
    """Addresses of the nodes running each live replica of ``deployment``."""
    from ray.util.state import list_actors

    from helpers.config import APP_NAME

    actors = list_actors(
        address=_state_api_address(),
        filters=[
            ("class_name", "=", f"ServeReplica:{APP_NAME}:{deployment}"),
            ("state", "=", "ALIVE"),
        ],
        raise_on_missing_output=False,
    )
    ips = alive_nodes()
    return sorted(ips.get(actor.node_id, "?") for actor in actors)


_opened: LocalCluster | None = None
"""The cluster :func:`open_cluster` started in this process and has not closed:
a re-run cell, or Run All twice, gets it back instead of starting another."""


def open_cluster(worker_cpus: float = 1) -> LocalCluster | None:
    """Connect this process to the cluster at ``RAY_ADDRESS``; when it is unset,
    first start a head and one worker on this machine and point it there.

    Returns the cluster started here, for :func:`close_cluster`, or None. A
    second call returns the same cluster, connected, while its head runs.
    """
    global _opened
    apply_ray_env()
    import ray

    if _opened is not None and not _opened.running:
        _opened.close()  # stopped elsewhere: its workers, and its RAY_ADDRESS
    drop_stale_connection()  # after: the close may have stopped what still answered
    started = None
    try:
        if _opened is None and not os.environ.get("RAY_ADDRESS"):
            _refuse_if_taken()
            started = start_head()
            started.add_worker(worker_cpus)
            _opened = started
            os.environ["RAY_ADDRESS"] = started.address
        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"], namespace="serve", log_to_driver=False)
    except BaseException:  # a failed start, or the user's interrupt: stop what started
        if started:
            started.close()
        raise
    return _opened


def _refuse_if_taken() -> None:
    """Say why before starting a head that could not run: with notebook 01's
    cluster up, both would want :data:`~helpers.serve.preflight.CLUSTER_PORTS`
    (the dashboard and Serve's proxy bind 127.0.0.1, the head's GCS every
    interface)."""
    if cluster_running():
        raise RuntimeError(
            f"notebook 01's cluster is still running: {STOP_FIRST} "
            "(it stops any Ray cluster on this machine, nodes an earlier kernel "
            "of this notebook left included)"
        )
    taken = [
        f"{port} ({name})" for port, name in CLUSTER_PORTS.items() if port_open("127.0.0.1", port)
    ]
    if taken:
        raise RuntimeError(
            f"a cluster here needs ports on 127.0.0.1 that are taken: {', '.join(taken)}. "
            f"If it is notebook 01's cluster, {STOP_FIRST}; else stop what holds them."
        )


def close_cluster(started: LocalCluster | None) -> None:
    """Notebook 07's clean-up, harmless to run again, and after a deploy
    that failed or never ran: delete the app, disconnect this process, and
    stop the nodes if :func:`open_cluster` started them. A cluster the user
    brought is left running, with Serve's other apps.

    On a cluster started here, Serve itself (its controller and proxies, the
    app with them) is shut down before the nodes: a node still holding
    Serve's actors waits for them before it stops. Elsewhere the app is
    deleted only where Serve has it: ``serve.delete`` raises when no Serve
    runs at all."""
    import ray
    from ray import serve

    from helpers.config import APP_NAME

    drop_stale_connection()
    try:
        if ray.is_initialized():
            if started:
                serve.shutdown()
            elif APP_NAME in serve.status().applications:
                serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        if started:
            started.close()
