"""A real JupyterLab on loopback, and what a person does in it, through Playwright.

The browser is Debian's ``chromium`` (never one a test tool downloads). The lab
gets its own settings and workspace folders, so what a developer configured in
their own JupyterLab cannot change what the test sees: every cell stays in the
page (no windowing) and no news prompt covers the notebook.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.shell import unsourced_env

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts" / "browser"
INSTALL_HINT = (
    "install Debian's chromium (`apt-get install chromium`; `make test` does this as root)"
)

LAB_SETTINGS = {
    # The lab runs the repository's own notebooks: never save their outputs.
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
WIDGET_ERROR = "Error displaying widget"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass(frozen=True)
class Lab:
    url: str
    token: str

    def notebook_url(self, path: str) -> str:
        """``reset``: a fresh workspace holding this notebook alone, not the
        tabs the previous page left open (their hidden copies of the same
        toolbar would answer the waits below)."""
        return f"{self.url}/lab/tree/{path}?reset&token={self.token}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def jupyterlab(home: Path) -> Iterator[Lab]:
    """``jupyter lab`` on 127.0.0.1 with a random token, stopped on the way out."""
    settings = home / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **unsourced_env(),  # as a JupyterLab the user started: the kernels apply Ray's settings
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    log = (home / "jupyterlab.log").open("wb")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1"]
    command += [f"--port={port}", f"--IdentityProvider.token={token}", f"--notebook-dir={REPO}"]
    if os.geteuid() == 0:  # containers and CI machines often run as root
        command.append("--allow-root")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    lab = Lab(f"http://127.0.0.1:{port}", token)
    committed = {path: path.read_bytes() for path in NOTEBOOKS.glob("*.ipynb")}
    try:
        _wait_until_serving(lab, server)
        yield lab
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        changed = [path.name for path, text in committed.items() if path.read_bytes() != text]
        for path, text in committed.items():
            path.write_bytes(text)
    assert not changed, f"JupyterLab saved over {changed} (restored): is autosave off?"


def _wait_until_serving(lab: Lab, server: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("jupyter lab exited before it served")
        try:
            if requests.get(f"{lab.url}/api/status?token={lab.token}", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"jupyter lab did not answer within {timeout_s:.0f} s")


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def open_notebook(page: Any, lab: Lab, path: str) -> None:
    """Open a notebook and wait until its kernel is idle and ready to run."""
    page.goto(lab.notebook_url(path))
    page.locator(".jp-Notebook:visible").first.wait_for(timeout=120_000)
    # Until the kernel starts, the toolbar says "No Kernel" and reads idle.
    kernel = page.locator(".jp-Toolbar-kernelName:visible", has_text="Python 3")
    kernel.first.wait_for(timeout=120_000)
    indicator = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']:visible")
    indicator.first.wait_for(timeout=120_000)


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells, through the menu bar as a person would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def wait_for_check(page: Any, timeout_s: float, begins: str = "OK:") -> str:
    """Wait for an output that ``begins`` so, by default the check cell's
    "OK:" line; fail at once on a cell's error."""
    outputs = page.locator(".jp-Notebook:visible .jp-OutputArea-output")
    errors = page.locator(".jp-Notebook:visible [data-mime-type='application/vnd.jupyter.error']")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if errors.count():
            raise AssertionError(f"a cell failed:\n{errors.first.inner_text()[-3000:]}")
        for text in outputs.all_inner_texts():
            if text.startswith(begins):
                return text
        time.sleep(2)
    raise AssertionError(f"no output began {begins!r} within {timeout_s:.0f} s")
