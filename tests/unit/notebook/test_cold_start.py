"""Unit tests for helpers.notebook.cold_start: a cold start's phases from /healthz."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from helpers.notebook.client import ApiError
from helpers.notebook.cold_start import cold_start, plot_cold_start, spare_state, wait_for_spare
from tests.unit.notebook.fake_ingress import UNAVAILABLE_BODY

ENGINE = {"imports_s": 0.01, "tokenizer_s": 0.5, "weights_s": 0.2, "warm_up_s": 0.1}


def model_start(process: float, init: float, ready: float, spare: bool) -> dict:
    return {
        "process_started": process,
        "init_started": init,
        "ready": ready,
        "engine": ENGINE,
        "spare": spare,
    }


def test_a_new_process_splits_into_consecutive_phases_that_add_up() -> None:
    cold = cold_start(model_start(100.5, 103.5, 104.4, spare=False), 100.0, 5.0)
    assert cold.phases == pytest.approx(
        {
            "Serve and Ray: a process": 0.5,
            "Python, Ray, torch, the kit": 3.01,
            "tokenizer": 0.5,
            "weights": 0.2,
            "warm-up pass": 0.1,
            "registered, routed, first token": 0.69,
        }
    )
    assert cold.total_s == pytest.approx(5.0)
    assert not cold.spare


def test_a_spare_process_imported_nothing_after_the_request() -> None:
    cold = cold_start(model_start(100.4, 100.4, 100.6, spare=True), 100.0, 1.2)
    assert cold.phases["Serve and Ray: a process"] == pytest.approx(0.4)
    assert cold.phases["Python, Ray, torch, the kit"] == pytest.approx(0.01)
    assert cold.total_s == pytest.approx(1.2)
    assert cold.spare


def test_a_process_older_than_the_request_starts_no_phase_before_it() -> None:
    cold = cold_start(model_start(90.0, 101.0, 101.9, spare=False), 100.0, 2.5)
    assert cold.phases["Serve and Ray: a process"] == 0
    assert cold.phases["Python, Ray, torch, the kit"] == pytest.approx(1.01)
    assert cold.total_s == pytest.approx(2.5)


def test_the_plot_stacks_every_phase_beside_the_warm_request() -> None:
    import matplotlib.pyplot as plt

    cold = cold_start(model_start(100.4, 100.4, 100.6, spare=True), 100.0, 1.2)
    figure = plot_cold_start(cold, 0.08)
    try:
        (axes,) = figure.axes
        widths = [bar.get_width() for bar in axes.patches]
        assert widths[:-1] == pytest.approx(list(cold.phases.values()))
        assert widths[-1] == 0.08
        assert [label.get_text() for label in axes.get_yticklabels()] == ["cold", "warm"]
        assert "spare process" in axes.get_title()
        figure.canvas.draw()
    finally:
        plt.close(figure)


NONE = {"state": "none", "pid": None}
READY = {"state": "ready", "pid": 4242}
UNAVAILABLE = 503
"""In a script of answers: /healthz answers 503, as when Serve's controller is slow."""
Answer = dict[str, Any] | int


@contextmanager
def healthz_server(script: list[Answer]) -> Iterator[tuple[str, list[Answer]]]:
    """A loopback server whose ``/healthz`` gives the script's answers in
    order, then repeats the last: a spare's state, or :data:`UNAVAILABLE`.
    It keeps every answer it gave."""
    answers = iter(script)
    answered: list[Answer] = []

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answered.append(next(answers, script[-1]))
            if answered[-1] == UNAVAILABLE:
                status, payload = UNAVAILABLE, UNAVAILABLE_BODY
            else:
                status, payload = 200, {"status": "ok", "spare_worker": answered[-1]}
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answered
    finally:
        server.shutdown()
        server.server_close()


def test_waiting_for_the_spare_returns_the_state_that_ended_the_wait() -> None:
    with healthz_server([NONE, READY]) as (url, answered):
        assert wait_for_spare(url, timeout_s=30) == READY
    assert answered == [NONE, READY]  # no read after it


def test_a_503_from_healthz_raises_the_api_error() -> None:
    with healthz_server([UNAVAILABLE]) as (url, _), pytest.raises(ApiError) as caught:
        spare_state(url)
    assert caught.value.status == 503
    assert caught.value.body == UNAVAILABLE_BODY


def test_waiting_for_the_spare_polls_again_after_a_503() -> None:
    """Serve's controller too slow to tell says nothing about the spare."""
    with healthz_server([UNAVAILABLE, READY]) as (url, answered):
        assert wait_for_spare(url, timeout_s=30) == READY
    assert answered == [UNAVAILABLE, READY]
