"""Cold start from zero model replicas to the first streamed token, against warm.

    python -m bench.cold_start            (--help for the knobs)

Runs a server (``make serve``'s app unless ``--server`` says otherwise) with a
short idle timeout (``bench/servers.py``), which changes when its model is
dropped, not how it comes back. Each cycle waits until the model is gone (zero replicas; for
``transformers serve``, the model unloaded), streams one greedy completion
through ``/v1/completions`` and times its first piece of text. The same
request right after is the warm figure. Before each cycle, a fresh ``python -c
"import torch"`` is timed too: the yardstick of the target (a cold start in at
most half of it), measured on the same host in the same minute.

With ``SPARE_WORKER=on`` (the default), one unmeasured request comes first (a
spare is left by a replica that stops), and each cycle also waits until
``/healthz`` says a spare is ready, as it is after any idle time longer than its
imports; ``SPARE_WORKER=off python -m bench.cold_start`` measures without.

For a Serve app, ``/healthz`` then says when the replica that answered started
its process and where its start went (``model_start``), which splits the wait
into consecutive parts: Serve and Ray starting the replica's process; Python,
Ray, the kit and torch loading in it; the engine's imports, tokenizer,
weights and warm-up pass; and the rest (the replica registering with Serve,
the request being routed to it, the prefill).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil
import requests

from bench.servers import IDLE_TIMEOUT_S, Server, servers, stream
from helpers.config import ServeConfig
from helpers.notebook.cold_start import spare_state, wait_for_spare

SCALE_DOWN_TIMEOUT_S = 180
TARGET_RATIO = 0.5
"""The cold start's median over ``import torch``'s: at most this (issue 27)."""
PARTS = (
    "process started",
    "Python, Ray, kit, torch",
    "engine imports",
    "tokenizer",
    "weights",
    "warm-up pass",
    "registered, routed, prefill",
)
HEADER = (
    "| server | cycle | cold: first token s | "
    + " | ".join(PARTS)
    + " | warm: first token s | import torch s | spare at rest MB |\n|"
    + "---|" * (len(PARTS) + 6)
)


@dataclass(frozen=True)
class ColdStart:
    server: str
    cycle: int
    cold_s: float
    warm_s: float
    parts: list[float] | None  # PARTS, in seconds; None when nobody could say
    import_torch_s: float
    spare_rss_mb: float | None  # the waiting spare's resident memory; None without one

    def row(self) -> str:
        parts = self.parts or [float("nan")] * len(PARTS)
        cells = " | ".join(f"{part:.2f}" for part in parts)
        return (
            f"| {self.server} | {self.cycle} | {self.cold_s:.2f} | {cells} | {self.warm_s:.3f} "
            f"| {self.import_torch_s:.2f} | {self.spare_rss_mb or float('nan'):.0f} |"
        )


def spare_rss_mb(server: Server) -> float | None:
    """Resident memory of the spare process that waits at zero replicas."""
    if not server.spare_worker:
        return None
    pid = spare_state(server.url)["pid"]
    return psutil.Process(pid).memory_info().rss / 2**20 if pid else None


def import_torch_s() -> float:
    """Wall time of a fresh ``python -c "import torch"``."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=120)
    return time.perf_counter() - started


def model_start(server: Server) -> dict:
    """How the running model replica's start went, as ``/healthz`` reports it."""
    return requests.get(f"{server.url}/healthz", timeout=10).json()["model_start"]


def breakdown(sent: float, first_token_s: float, startup: dict) -> list[float]:
    """The cold wait in consecutive parts (PARTS) that add up to it."""
    engine = startup["engine"]
    ready_after = startup["ready"] - sent
    return [
        startup["process_started"] - sent,
        startup["init_started"] - startup["process_started"],
        engine["imports_s"],
        engine["tokenizer_s"],
        engine["weights_s"],
        engine["warm_up_s"],
        first_token_s - ready_after,
    ]


def wait_until_idle(server: Server) -> None:
    """Until the model is gone: zero replicas, or transformers' idle unload."""
    if not server.ray_app:
        time.sleep(IDLE_TIMEOUT_S + 5)
        return
    deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
    while requests.get(f"{server.url}/healthz", timeout=10).json()["model_replicas"]["running"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: the model did not scale to zero")
        time.sleep(1)
    if server.spare_worker:
        wait_for_spare(server.url)
    time.sleep(2)  # a replica that just stopped has released its CPU


def measure(server: Server, cycles: int) -> list[ColdStart]:
    """``cycles`` cold starts of ``server``, each printed as it comes."""
    results = []
    with server.started(cold=True):
        if server.spare_worker:
            stream(server, 0, 8)  # a spare comes from a replica that stopped: run one first
        for cycle in range(1, cycles + 1):
            wait_until_idle(server)
            rss_mb = spare_rss_mb(server)
            torch_s = import_torch_s()
            cold = stream(server, 0, 8)
            warm = stream(server, 0, 8)
            parts = None
            if server.ray_app:
                startup = model_start(server)
                # A replica that became ready before the request, or after its
                # first token, is not the one that answered it.
                if startup and cold.sent < startup["ready"] <= cold.sent + cold.first_token_s:
                    parts = breakdown(cold.sent, cold.first_token_s, startup)
            results.append(
                ColdStart(
                    server.name,
                    cycle,
                    cold.first_token_s,
                    warm.first_token_s,
                    parts,
                    torch_s,
                    rss_mb,
                )
            )
            print(results[-1].row(), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--server", choices=("app", "baseline", "transformers"), default="app")
    args = parser.parse_args()
    print(HEADER)
    results = measure(servers(ServeConfig.from_env())[args.server], args.cycles)
    print(verdict(results))


def verdict(results: list[ColdStart]) -> str:
    """Median cold start against median ``import torch``, and the target."""
    cold = statistics.median(r.cold_s for r in results)
    torch_s = statistics.median(r.import_torch_s for r in results)
    ratio = cold / torch_s
    met = "met" if ratio <= TARGET_RATIO else "missed"
    return (
        f"\nmedian cold start to first token {cold:.2f} s, median `import torch` {torch_s:.2f} s: "
        f"{ratio:.2f}x (target <= {TARGET_RATIO}x: {met}), {len(results)} cycles"
    )


if __name__ == "__main__":
    main()
