"""The kit's Ray settings hold however the kit is entered, with nothing sourced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.ray_env import RAY_ENV
from tests.shell import unsourced_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "entry",
    ["helpers.notebook.deploy", "helpers.serve.cli", "ray_serve_app"],
    ids=["a notebook's deploy", "the serve command", "serve run's import"],
)
def test_importing_the_kit_applies_the_ray_settings_before_ray_reads_them(entry: str) -> None:
    """Ray reads the loopback switch when first imported; a kernel that imported
    it without the switch waited on the machine's network address for a cluster
    listening on 127.0.0.1."""
    code = (
        f"import os, {entry}; from ray._private import ray_constants; "
        "print(ray_constants.ENABLE_RAY_CLUSTER, os.environ['RAY_AUTH_MODE'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=unsourced_env(), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "token"]


def test_the_shell_script_exports_the_same_settings_from_any_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "-c", f"source {REPO / 'scripts' / 'ray_env.sh'} && env"],
        env=unsourced_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    exported = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert {name: exported.get(name) for name in RAY_ENV} == RAY_ENV
