"""The app as ``make serve`` runs it against ``transformers serve --continuous-batching``.

    python -m bench.versus_transformers          (--help for the knobs)

Both serve the same converted embedded model on loopback, one at a time on
the machine, and get the same closed-loop load through ``POST /v1/completions``:
the prompts of ``bench/throughput.py``, greedy, ``max_tokens`` new tokens, no
stop sequence. Output tokens are each server's own ``usage.completion_tokens``.
Each server is warmed up first, the app until its autoscaler has brought the
model up to ``MAX_REPLICAS``, so neither cold start is counted. Prints a table, the
ratio, and the failed requests of each, and appends the table to
``bench/RESULTS.md`` with the machine, versions and date.
"""

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version
from pathlib import Path

import requests

from bench.throughput import PROMPTS, Result
from bench.ttft import percentile
from helpers.config import ServeConfig
from helpers.embedded_model import ensure_converted

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
OURS_URL = "http://127.0.0.1:8000"
THEIRS_URL = "http://127.0.0.1:8001"
START_TIMEOUT_S = 300
WARM_UP_TIMEOUT_S = 180


@dataclass
class Outcome(Result):
    """A throughput result that also counts the requests that failed."""

    failed: int = 0

    def row(self) -> str:
        latencies = self.latencies or [float("nan")]  # every request failed
        return (
            f"| {self.server:<28} | {self.concurrency:>3} | {self.requests:>4} | "
            f"{self.failed:>6} | "
            f"{self.tokens_per_s:>7.1f} | {percentile(latencies, 0.5):>6.2f} | "
            f"{percentile(latencies, 0.95):>6.2f} |"
        )


HEADER = (
    "| server                       |   c | reqs | failed |  tok/s | p50 s  | p95 s  |\n"
    "|------------------------------|-----|------|--------|--------|--------|--------|"
)


def drive(
    server: str, url: str, model: str, concurrency: int, total: int, max_tokens: int
) -> Outcome:
    """``total`` completions from ``concurrency`` closed-loop clients."""

    def one(index: int) -> tuple[float, int] | None:
        body = {
            "model": model,
            "prompt": PROMPTS[index % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        started = time.perf_counter()
        try:
            response = requests.post(f"{url}/v1/completions", json=body, timeout=600)
            response.raise_for_status()
            tokens = response.json()["usage"]["completion_tokens"]
        except (requests.RequestException, KeyError, ValueError):
            return None
        return time.perf_counter() - started, tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(total)))
    seconds = time.perf_counter() - started
    answered = [r for r in results if r is not None]
    return Outcome(
        server,
        concurrency,
        total,
        sum(tokens for _, tokens in answered),
        seconds,
        [latency for latency, _ in answered],
        failed=total - len(answered),
    )


@contextmanager
def running(command: list[str], health_url: str, env: dict[str, str]) -> Iterator[None]:
    """A server in its own process group, up until Ctrl-C-like SIGINT stops it."""
    log = open(REPO / "test-artifacts" / f"bench-{Path(command[0]).name}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(health_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not come up; see {log.name}")
            time.sleep(1)
        yield
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def all_replicas_up(url: str) -> bool:
    """For the app: has load brought the model up to MAX_REPLICAS yet?"""
    health = requests.get(f"{url}/healthz", timeout=10).json()
    return health["model_replicas"]["running"] >= health["max_replicas"]


def warm_up(server: str, url: str, model: str, concurrency: int, ready: Callable[[], bool]) -> None:
    """Bursts until ``ready``: the app's autoscaler adds replicas only under
    sustained load, and the steady state under load is what is compared."""
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    drive(server, url, model, concurrency, concurrency, 16)
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server} did not reach its steady state while warming up")
        drive(server, url, model, concurrency, concurrency, 32)


def measure(
    server: str, url: str, model: str, args: argparse.Namespace, ready: Callable[[], bool]
) -> list[Outcome]:
    warm_up(server, url, model, args.concurrency, ready)
    outcomes = []
    for _ in range(args.runs):
        outcomes.append(drive(server, url, model, args.concurrency, args.requests, args.max_tokens))
        print(outcomes[-1].row(), flush=True)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="measurements per server")
    args = parser.parse_args()
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    config = ServeConfig.from_env()
    model_dir = str(ensure_converted(config.model_cache_dir))
    print(HEADER, flush=True)
    with running(["scripts/serve.sh"], f"{OURS_URL}/healthz", {}):
        layout = f"app, {config.max_replicas} x {config.num_cpus_per_replica:g} CPU"
        ours = measure(layout, OURS_URL, config.model_id, args, lambda: all_replicas_up(OURS_URL))
    theirs_command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        "--continuous-batching",
        "--host=127.0.0.1",
        "--port=8001",
        model_dir,
    ]
    with running(theirs_command, f"{THEIRS_URL}/health", {"HF_HUB_OFFLINE": "1"}):
        theirs = measure("transformers serve --cb", THEIRS_URL, model_dir, args, lambda: True)
    best = max(o.tokens_per_s for o in ours) / max(o.tokens_per_s for o in theirs)
    summary = f"app / transformers serve --continuous-batching = {best:.2f}x output tokens/s"
    print(summary)
    write_results([*ours, *theirs], summary, args)


def write_results(outcomes: list[Outcome], summary: str, args: argparse.Namespace) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "ray"))
    command = f"python -m bench.versus_transformers {' '.join(sys.argv[1:])}".strip()
    lines = [
        f"\n## Head to head, {date.today().isoformat()}\n",
        f"`{command}` on {machine}; {versions}. {args.requests} requests at concurrency "
        f"{args.concurrency}, {args.max_tokens}-token greedy completions through "
        "`/v1/completions`, one server at a time.\n",
        HEADER,
        *(o.row() for o in outcomes),
        f"\n{summary}.\n",
    ]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the benchmark commands, newest last.\n"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join(lines))


if __name__ == "__main__":
    main()
