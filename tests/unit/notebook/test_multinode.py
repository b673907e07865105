"""Notebook 07's cluster helpers (helpers/notebook/multinode.py) when a learner
re-runs cells, runs them out of order or interrupts them.

No Ray runs here: ``ray start`` is a shell script that says it started and
sleeps (its own session, as a node's is), and the driver's ``ray.init``,
``ray.shutdown`` and Serve's ``status``, ``delete`` and ``shutdown`` are
stand-ins that fail where Ray 2.60's do. A head's GCS "answers"
while its script runs. What a real cluster does is
tests/integration/test_cluster_multinode.py's.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import ray._common.utils
from ray.serve.exceptions import RayServeException

from helpers.notebook import cluster, multinode
from helpers.notebook.multinode import HEAD_ADDRESS, HEAD_IP, open_cluster
from helpers.notebook.polling import wait_for

FAKE_RAY_START = """#!/bin/sh
[ -n "$FAKE_RAY_SILENT" ] || echo 'Ray runtime started.'
exec sleep 600
"""


@dataclass
class FakeRay:
    """The driver's side of Ray: whether it is connected, and to what."""

    initialized: bool = False
    inits: list[str] = field(default_factory=list)
    shutdowns: int = 0
    apps: set[str] = field(default_factory=set)
    """The Serve apps running; none and no Serve at all until one is deployed."""
    deleted: list[str] = field(default_factory=list)
    serve_shutdowns: int = 0
    interrupt_init: bool = False

    def init(self, address: str, **_: object) -> None:
        if self.initialized:
            raise RuntimeError("Maybe you called ray.init twice by accident?")
        if self.interrupt_init:
            raise KeyboardInterrupt
        self.initialized = True
        self.inits.append(address)

    def shutdown(self) -> None:
        self.initialized = False
        self.shutdowns += 1

    def serve_status(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(applications=dict.fromkeys(self.apps))

    def serve_delete(self, name: str) -> None:
        if not self.apps:  # as Ray's: no controller is running to ask
            raise RayServeException("There is no Serve instance running on this Ray cluster.")
        self.apps.discard(name)
        self.deleted.append(name)

    def serve_shutdown(self) -> None:
        self.apps.clear()
        self.serve_shutdowns += 1

    def runtime_context(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(gcs_address=self.inits[-1])


@dataclass
class Machine:
    """This machine as the helpers see it: the driver, the node processes
    started, whether ``ray status`` finds a cluster, and other open ports."""

    ray: FakeRay
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cluster_up: bool = False
    open_ports: set[tuple[str, int]] = field(default_factory=set)

    def port_open(self, host: str, port: int, timeout_s: float = 1.0) -> bool:
        if (host, port) == (HEAD_IP, multinode.GCS_PORT):
            return any(p.poll() is None and "--head" in p.args for p in self.processes)
        return (host, port) in self.open_ports

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.processes if p.poll() is None]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Machine]:
    fake_ray = FakeRay()
    state = Machine(fake_ray)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the nodes' logs, kept or not
    script = tmp_path / "ray"
    script.write_text(FAKE_RAY_START)
    script.chmod(0o755)
    monkeypatch.setattr(multinode, "cli_path", lambda name: str(script))
    monkeypatch.setattr(multinode, "wait_for", functools.partial(wait_for, interval_s=0.02))
    real_popen = subprocess.Popen

    def tracked_popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)
        state.processes.append(process)
        return process

    monkeypatch.setattr(subprocess, "Popen", tracked_popen)
    monkeypatch.setattr(
        cluster,
        "ray_command",
        lambda *args, **_: subprocess.CompletedProcess(args, 0 if state.cluster_up else 1),
    )
    monkeypatch.setattr(cluster, "port_open", state.port_open, raising=False)
    monkeypatch.setattr(multinode, "port_open", state.port_open, raising=False)
    monkeypatch.setattr(multinode, "_opened", None, raising=False)
    monkeypatch.setattr(ray, "init", fake_ray.init)
    monkeypatch.setattr(ray, "shutdown", fake_ray.shutdown)
    monkeypatch.setattr(ray, "is_initialized", lambda: fake_ray.initialized)
    monkeypatch.setattr(ray, "get_runtime_context", fake_ray.runtime_context)
    serve = types.ModuleType("ray.serve")
    serve.status = fake_ray.serve_status  # type: ignore[attr-defined]
    serve.delete = fake_ray.serve_delete  # type: ignore[attr-defined]
    serve.shutdown = fake_ray.serve_shutdown  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    monkeypatch.setattr(ray, "serve", serve, raising=False)
    address_file = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(ray._common.utils, "get_ray_address_file", lambda _: str(address_file))
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS")  # and the fixture's undo removes whatever is set later
    try:
        yield state
    finally:
        for process in state.running():  # alive, so not reaped: its group is still ours
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def interrupt_at(monkeypatch: pytest.MonkeyPatch, ip: str) -> None:
    """Ctrl-C while the node at ``ip`` starts."""
    polling: Callable[..., None] = multinode.wait_for

    def interrupted(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        if ip in what:
            raise KeyboardInterrupt
        polling(condition, timeout_s, what)

    monkeypatch.setattr(multinode, "wait_for", interrupted)


def test_it_refuses_while_notebook_01s_cluster_runs_and_says_how_to_stop_it(
    machine: Machine,
) -> None:
    machine.cluster_up = True
    with pytest.raises(RuntimeError) as refused:
        open_cluster()
    assert (
        "notebook 01's cluster is still running: run stop_cluster() (notebook 06, step 5) first"
        in str(refused.value)
    )
    assert machine.processes == [] and machine.ray.inits == []
    assert "RAY_ADDRESS" not in os.environ


@pytest.mark.parametrize("port", [8000, 8265, 6379])
def test_it_refuses_when_a_port_the_cluster_needs_is_taken(machine: Machine, port: int) -> None:
    machine.open_ports.add(("127.0.0.1", port))
    with pytest.raises(RuntimeError, match=rf"taken: {port} .*stop_cluster\(\)"):
        open_cluster()
    assert machine.processes == [] and "RAY_ADDRESS" not in os.environ


def test_running_the_start_cell_again_returns_the_cluster_it_started(machine: Machine) -> None:
    first = open_cluster()
    again = open_cluster()
    assert first is not None and again is first
    assert len(machine.processes) == 2, "one head and one worker, started once"
    assert machine.ray.inits == [HEAD_ADDRESS]
    assert os.environ["RAY_ADDRESS"] == HEAD_ADDRESS


def test_closing_twice_stops_the_nodes_disconnects_and_forgets_ray_address(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = open_cluster()
    assert started is not None
    machine.ray.apps.add("RayServeLLM")
    logs = [node.log for node in [started.head, *started.workers]]
    multinode.close_cluster(started)
    signalled: list[int] = []
    with monkeypatch.context() as patched:
        patched.setattr(os, "killpg", lambda pid, _: signalled.append(pid))
        multinode.close_cluster(started)
    assert signalled == [], "a second close signals ids that may name other processes now"
    assert machine.running() == []
    assert not any(log.exists() for log in logs), "a closed node's log is deleted"
    assert machine.ray.apps == set() and not machine.ray.initialized
    assert machine.ray.serve_shutdowns == 1, "Serve, the app with it, goes before the nodes"
    assert "RAY_ADDRESS" not in os.environ

    reopened = open_cluster()  # Run All again, after the close cell
    assert reopened is not None and reopened is not started and reopened.running
    assert machine.ray.inits == [HEAD_ADDRESS, HEAD_ADDRESS]


def test_a_cluster_the_user_brought_is_left_running_and_its_address_kept(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    machine.open_ports.add(("10.0.0.1", 6379))
    assert open_cluster() is None
    assert open_cluster() is None
    machine.ray.apps.update({"RayServeLLM", "theirs"})
    multinode.close_cluster(None)
    multinode.close_cluster(None)
    assert machine.processes == []
    assert machine.ray.inits == ["10.0.0.1:6379"] and not machine.ray.initialized
    assert machine.ray.deleted == ["RayServeLLM"]
    assert machine.ray.apps == {"theirs"}, "the user's Serve keeps its other apps"
    assert machine.ray.serve_shutdowns == 0
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


@pytest.mark.parametrize("brought", [False, True], ids=["started here", "the user's"])
def test_closing_after_a_deploy_that_failed_or_never_ran_stops_what_it_started(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, brought: bool
) -> None:
    if brought:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        machine.open_ports.add(("10.0.0.1", 6379))
    started = open_cluster()
    multinode.close_cluster(started)  # no Serve runs: Ray's serve.delete would raise
    assert machine.running() == [] and not machine.ray.initialized
    assert machine.ray.deleted == []


def test_an_interrupt_while_the_worker_starts_stops_the_head_and_the_worker(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt_at(monkeypatch, "127.0.0.3")
    with pytest.raises(KeyboardInterrupt):
        open_cluster()
    assert len(machine.processes) == 2 and machine.running() == []
    assert machine.ray.inits == [] and "RAY_ADDRESS" not in os.environ


def test_an_interrupt_while_connecting_stops_the_cluster_and_forgets_its_address(
    machine: Machine,
) -> None:
    machine.ray.interrupt_init = True
    with pytest.raises(KeyboardInterrupt):
        open_cluster()
    assert len(machine.processes) == 2 and machine.running() == []
    assert "RAY_ADDRESS" not in os.environ

    machine.ray.interrupt_init = False
    assert open_cluster() is not None, "the next try starts afresh"


def test_a_cluster_stopped_elsewhere_is_cleared_away_and_started_again(
    machine: Machine,
) -> None:
    started = open_cluster()
    assert started is not None
    started.head.kill()  # notebook 06's `ray stop`, run in another kernel
    reopened = open_cluster()
    assert reopened is not None and reopened is not started
    assert started.workers[0].process.poll() is not None, "the old worker is stopped"
    assert machine.ray.shutdowns == 1 and machine.ray.inits == [HEAD_ADDRESS, HEAD_ADDRESS]


def test_a_node_keeps_no_file_open_and_deletes_its_log_when_closed(machine: Machine) -> None:
    descriptors = set(os.listdir("/proc/self/fd"))
    head = multinode.start_head()
    head.close()
    assert set(os.listdir("/proc/self/fd")) == descriptors
    assert not head.head.log.exists()


def test_a_node_that_never_starts_is_killed_and_its_log_named(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_RAY_SILENT", "1")
    monkeypatch.setattr(multinode, "START_TIMEOUT_S", 0)
    with pytest.raises(TimeoutError, match=r"127\.0\.0\.2 to start \(.*ray-node-127\.0\.0\.2-"):
        open_cluster()
    assert len(machine.processes) == 1 and machine.running() == []


def test_closing_a_cluster_it_did_not_open_leaves_ray_address_alone(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with multinode.local_cluster() as running:
        monkeypatch.setenv("RAY_ADDRESS", running.address)  # as the integration test's serve run
    assert machine.running() == []
    assert os.environ["RAY_ADDRESS"] == HEAD_ADDRESS
