"""``make serve``'s checks before it starts anything, and the kit's ``serve``
command saying a bad variable or a missing cluster in one line."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from helpers.serve import cli
from helpers.serve.preflight import problems

ROOT = Path(__file__).resolve().parents[3]
SERVE = Path(sys.executable).with_name("serve")


def test_a_bad_variable_is_named_with_its_range() -> None:
    (found,) = problems({"MAX_REPLICAS": "two"})
    assert "MAX_REPLICAS='two' is invalid" in found and "integer in [1, 100]" in found


def test_a_port_something_listens_on_is_named_and_a_free_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        taken = listening.getsockname()[1]
        with socket.create_server(("127.0.0.1", 0)) as closed_soon:
            free = closed_soon.getsockname()[1]
        found = problems({}, {taken: "a test's server", free: "nothing now"})
    assert len(found) == 1 and f"port {taken} (a test's server)" in found[0]


def test_the_script_says_each_problem_in_a_line_and_fails() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "helpers.serve.preflight"],
        cwd=ROOT,
        env={**os.environ, "MAX_REPLICAS": "two", "TOP_P": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make serve: ")
    assert "Traceback" not in run.stderr


def test_serve_run_with_a_bad_variable_says_it_in_a_line_before_starting_ray() -> None:
    """``serve run`` imports the app before it joins or starts a cluster."""
    run = subprocess.run(
        [str(SERVE), "run", "ray_serve_app:deployment_graph"],
        cwd=ROOT,
        env={**os.environ, "MAX_REPLICAS": "two", "RAY_ADDRESS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.startswith("Error: ") and "MAX_REPLICAS='two' is invalid" in run.stderr
    assert "Traceback" not in run.stderr


def test_serve_delete_without_a_cluster_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster(**_: object) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(cli.ray, "init", no_cluster)
    result = CliRunner().invoke(cli.delete, ["RayServeLLM", "--address", "auto"])
    assert result.exit_code == 1
    assert "No Ray cluster is running at auto." in result.output


def test_the_command_says_a_missing_cluster_in_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def status_without_a_cluster() -> None:
        raise ConnectionError("Failed to connect to Ray at address: http://localhost:8265.")

    monkeypatch.setattr(cli, "cli", status_without_a_cluster)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert str(exited.value.code).startswith("Error: Failed to connect to Ray")
    assert "make serve" in str(exited.value.code)
    assert not isinstance(exited.value, click.ClickException)
