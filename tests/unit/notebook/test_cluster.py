"""Joining the notebooks' shared cluster (helpers/notebook/cluster.py) after
another notebook stopped it, with stand-ins for Ray and the GCS's port."""

from __future__ import annotations

import socket
import types

import pytest
import ray

from helpers.notebook import cluster


@pytest.fixture
def joined(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A driver connected to 127.0.0.1:6379; what connect() did, in order."""
    calls: list[str] = []
    state = {"initialized": True}

    def shutdown() -> None:
        state["initialized"] = False
        calls.append("shutdown")

    def init(address: str, **_: object) -> None:
        state["initialized"] = True
        calls.append(f"init {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="127.0.0.1:6379")
    )
    monkeypatch.setattr(cluster, "start_cluster", lambda: calls.append("start_cluster"))
    return calls


def gcs(monkeypatch: pytest.MonkeyPatch, answers: bool) -> list[tuple[str, int]]:
    """The GCS port check, answering ``answers``; the addresses it was asked."""
    asked: list[tuple[str, int]] = []

    def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
        asked.append((host, port))
        return answers

    monkeypatch.setattr(cluster, "port_open", port_open, raising=False)
    return asked


def test_connect_joins_again_when_the_cluster_it_joined_was_stopped(
    joined: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = gcs(monkeypatch, answers=False)  # notebook 06 ran `ray stop` meanwhile
    cluster.connect()
    assert asked == [("127.0.0.1", 6379)]
    assert joined == ["shutdown", "start_cluster", "init auto"]


def test_connect_keeps_a_connection_whose_gcs_answers(
    joined: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gcs(monkeypatch, answers=True)
    cluster.connect()
    assert joined == []


def test_port_open_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert cluster.port_open("127.0.0.1", port)
    assert not cluster.port_open("127.0.0.1", port)


def test_metrics_url_says_which_node_it_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "connect", lambda: None)
    nodes = [{"Alive": True, "NodeManagerAddress": "127.0.0.2", "MetricsExportPort": 8080}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(RuntimeError, match=r"no live Ray node at 127\.0\.0\.1.*\['127\.0\.0\.2'\]"):
        cluster.metrics_url()
