"""A person's step-through in a real JupyterLab, in a headless Chromium.

nbmake proves the notebooks run; this proves what a reader sees: the prompt
box renders as widgets (not "Error displaying widget"), a typed prompt sent
with a click streams its reply into the page, and the scale-down notebook
draws its plot. Screenshots of each stage land in ``test-artifacts/browser``.
"""

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.notebook.cluster import cluster_running, stop_cluster

from .jupyterlab import (
    INSTALL_HINT,
    WIDGET_ERROR,
    Lab,
    chromium_path,
    jupyterlab,
    open_notebook,
    run_all_cells,
    screenshot,
    wait_for_check,
)

REQUIRED = os.environ.get("REQUIRE_BROWSER_TEST") == "1"
"""Set by ``.ci/run``: there a missing browser fails the run instead of skipping."""

NOTEBOOK_TIMEOUT_S = 600
REPLY_TIMEOUT_S = 120
FINAL_STATUS = re.compile(r"\[\d+\.\d+ s, first text after \d+\.\d+ s, \d+ tokens\]")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if chromium_path() is None:
        (pytest.fail if REQUIRED else pytest.skip)(f"no chromium on PATH: {INSTALL_HINT}")
    cluster_before = cluster_running()
    with jupyterlab(tmp_path_factory.mktemp("jupyterlab")) as running:
        yield running
    if not cluster_before:
        stop_cluster()  # the one the notebooks' kernels started, answering or not


@pytest.fixture(scope="module")
def page(lab: Lab) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox"]
        )
        try:
            yield chromium.new_page(viewport={"width": 1280, "height": 900})
        finally:
            chromium.close()


def prompt_box(page: Any) -> Any:
    send = page.get_by_role("button", name="Send", exact=True)
    return page.locator(".widget-vbox").filter(has=send).last


def test_the_prompt_box_renders_and_streams_a_typed_prompt(lab: Lab, page: Any) -> None:
    open_notebook(page, lab, "notebooks/04_send_requests.ipynb")
    screenshot(page, "01-send-requests-opened")
    run_all_cells(page)
    wait_for_check(page, NOTEBOOK_TIMEOUT_S)
    assert page.get_by_text(WIDGET_ERROR).count() == 0

    box = prompt_box(page)
    box.scroll_into_view_if_needed()
    box.get_by_role("button", name="New chat", exact=True).click()
    box.get_by_text("New chat started.").wait_for(timeout=30_000)
    box.locator("textarea").fill("Name three colours of the sea.")
    screenshot(page, "02-prompt-typed")
    box.get_by_role("button", name="Send", exact=True).click()

    partial_replies = watch_reply(box, lambda: screenshot(page, "03-reply-streaming"))
    box.screenshot(path=str(Path(screenshot(page, "04-reply-done")).with_name("prompt-box.png")))
    assert len(partial_replies) >= 2, f"the reply never showed in pieces: {partial_replies}"
    assert partial_replies[-1].strip()
    assert all(b.startswith(a) for a, b in itertools.pairwise(partial_replies))
    assert page.get_by_text(WIDGET_ERROR).count() == 0


def watch_reply(box: Any, on_first_text: Any) -> list[str]:
    """Every distinct text of the model's turn, until the status shows the timing."""
    seen: list[str] = []
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline:
        text = box.locator("pre").first.inner_text() if box.locator("pre").count() else ""
        model_turn = text.rpartition("Model:")[2] if "Model:" in text else ""
        if model_turn.strip() and (not seen or model_turn != seen[-1]):
            if not seen:
                on_first_text()
            seen.append(model_turn)
        if FINAL_STATUS.search(box.inner_text()):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no finished reply within {REPLY_TIMEOUT_S} s; saw {seen[-1:]}")


def test_the_scale_down_notebook_draws_its_plot(lab: Lab, page: Any) -> None:
    """Up to the first plot, drawn live while the model scales to zero: what
    follows draws the same way, and nbmake runs the notebook to its end."""
    open_notebook(page, lab, "notebooks/05_watch_scale_to_zero.ipynb")
    run_all_cells(page)
    wait_for_check(page, NOTEBOOK_TIMEOUT_S, begins="reached zero after")
    images = page.locator(".jp-Notebook:visible .jp-RenderedImage img")
    assert images.count() >= 1, "no plot rendered as an image"
    plot = images.first
    plot.scroll_into_view_if_needed()
    assert plot.evaluate("img => img.complete && img.naturalWidth > 0")
    screenshot(page, "05-scale-down-plot")
