"""A cold start split into what the request waited for, read over HTTP.

Notebook 05 sends a request at zero replicas and times its first text; the
replica that started for it reports its own clock readings in ``/healthz``
(``model_start``). Lined up, they split the wait into consecutive phases that
add up to the first-text time the notebook measured itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helpers.notebook.client import ApiError, LLMClient
from helpers.notebook.polling import wait_for

SPARE_TIMEOUT_S = 120
"""A spare imports torch and the kit after the replica before it stopped: a
few seconds here, more on a busy machine."""


@dataclass(frozen=True)
class ColdStart:
    """Seconds per phase, in order, and whether the replica ran in a spare."""

    phases: dict[str, float]
    spare: bool

    @property
    def total_s(self) -> float:
        return sum(self.phases.values())


def spare_state(base_url: str) -> dict[str, Any]:
    """``/healthz``'s ``spare_worker``: ``{"state": "ready" | "none" | "off", "pid": ...}``.
    Raises :class:`ApiError` when ``/healthz`` refuses, 503 included."""
    return LLMClient(base_url).healthz()["spare_worker"]


def wait_for_spare(base_url: str, timeout_s: float = SPARE_TIMEOUT_S) -> dict[str, Any]:
    """Until a spare process is ready, or the app keeps none (``SPARE_WORKER=off``):
    the state that said so. A 503 (Serve's controller too slow to answer
    ``/healthz``) says nothing about the spare, so the next poll asks again."""
    seen: dict[str, Any] = {}

    def settled() -> bool:
        try:
            seen.update(spare_state(base_url))
        except ApiError as err:
            if err.status != 503:
                raise
            return False
        return seen["state"] in ("ready", "off")

    wait_for(settled, timeout_s, "a spare process")
    return seen


def cold_start(model_start: dict[str, Any], sent_at: float, first_text_s: float) -> ColdStart:
    """The phases of a cold start: ``model_start`` from ``/healthz``, the
    request sent at Unix time ``sent_at``, its first text ``first_text_s`` later.

    A replica in a spare process has nothing in the second phase: its imports
    were done before the request. What the replica cannot see (Serve noticing
    it is ready, routing, the prefill) is the last phase, so the phases add
    up to ``first_text_s``.
    """
    engine = model_start["engine"]
    process = max(0.0, model_start["process_started"] - sent_at)
    imports = max(0.0, model_start["init_started"] - sent_at) - process + engine["imports_s"]
    phases = {
        "Serve and Ray: a process": process,
        "Python, Ray, torch, the kit": imports,
        "tokenizer": engine["tokenizer_s"],
        "weights": engine["weights_s"],
        "warm-up pass": engine["warm_up_s"],
    }
    phases["registered, routed, first token"] = first_text_s - sum(phases.values())
    return ColdStart(phases, bool(model_start["spare"]))


def plot_cold_start(cold: ColdStart, warm_first_text_s: float) -> Any:
    """The cold start as stacked phases, beside the warm request's first text."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 2.8))
    left = 0.0
    for name, seconds in cold.phases.items():
        axes.barh("cold", seconds, left=left, label=f"{name} ({seconds:.2f} s)")
        left += seconds
    axes.barh(
        "warm", warm_first_text_s, color="tab:gray", label=f"warm ({warm_first_text_s:.2f} s)"
    )
    axes.set_xlabel("seconds from the request to its first text")
    where = "a spare process" if cold.spare else "a new process"
    axes.set_title(f"Cold start: {cold.total_s:.2f} s, the replica ran in {where}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    return figure
