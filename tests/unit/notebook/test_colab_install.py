"""The notebooks' Colab install against Colab's own Jupyter stack.

Needs the package index: pip resolves the kit's run-time dependency list for
Colab's Python with Colab's Jupyter stack as constraints, installing nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.notebook.setup import HELD
from tests import pyproject

# Colab's GPU runtime as googlecolab/backend-info recorded it (pip-freeze.gpu.txt and
# os-info-gpu.txt, 2026-08-19). Its torch is left out: a CUDA build from PyTorch's own
# index, which the run-time list must not ask for at all (checked below).
COLAB_PYTHON = "3.13"
COLAB_JUPYTER = {
    "ipython": "7.34.0",
    "ipykernel": "6.17.1",
    "prompt-toolkit": "3.0.53",
    "tornado": "6.5.7",
    "pyzmq": "26.2.1",
    "jupyter-client": "7.4.9",
    "jupyter-server": "2.20.0",
    "notebook": "6.5.7",
    "ipywidgets": "7.7.1",
}
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
"""Wheels Colab's Ubuntu 22.04 (glibc 2.35) installs; llguidance ships manylinux_2_31 only."""


def normal(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.index
def test_the_colab_install_keeps_colabs_jupyter_stack_and_never_asks_for_torch(
    tmp_path: Path,
) -> None:
    assert set(COLAB_JUPYTER) <= {normal(name) for name in HELD}
    constraints = tmp_path / "colab.txt"
    constraints.write_text("".join(f"{name}=={v}\n" for name, v in COLAB_JUPYTER.items()))
    runtime = pyproject.project()["dependencies"]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    command += ["--quiet", "--report", str(report), "--python-version", COLAB_PYTHON]
    command += ["--only-binary=:all:", *(f"--platform={p}" for p in PLATFORMS)]
    command += ["-c", str(constraints), *runtime]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"pip would change Colab's Jupyter stack:\n{result.stderr}"
    installed = {
        normal(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "torch" not in installed, "the run-time list must not pull torch into Colab"
    for name, version in COLAB_JUPYTER.items():
        assert installed.get(name, version) == version, name
