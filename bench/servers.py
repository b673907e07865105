"""The servers the benchmarks compare, and the HTTP clients that load them.

Three servers answer the same OpenAI ``/v1/completions`` requests on loopback,
one at a time on the machine:

- ``app``: ``make serve`` (``scripts/serve.sh``), the project as users run it;
- ``baseline``: the walkthrough's design, one ``generate`` call per request
  (``scripts/serve.sh bench.baseline_app:app``), with the same ingress and
  replica settings, so it differs from the app only in batching;
- ``transformers``: ``transformers serve --continuous-batching`` on the same
  converted model, transformers' own OpenAI-compatible server.

Every client is closed-loop: each of ``concurrency`` clients sends its next
request when the last one is answered. Requests are greedy, with no stop
sequence, so every server does the same work for the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.throughput import PROMPTS, Result
from bench.ttft import percentile
from helpers.config import ServeConfig
from helpers.engine.embedded_model import ensure_converted

REPO = Path(__file__).resolve().parents[1]
OURS_URL = "http://127.0.0.1:8000"
THEIRS_URL = "http://127.0.0.1:8001"
START_TIMEOUT_S = 300
WARM_UP_TIMEOUT_S = 180
IDLE_TIMEOUT_S = 5
"""Idle time after which the cold-start runs let a server drop its model: the
Serve apps stop their model replica, transformers serve unloads its model."""


@dataclass(frozen=True)
class Server:
    """How to start one server, reach it, and tell when it is warm."""

    key: str
    name: str
    command: list[str]
    url: str
    health_path: str
    model: str
    env: dict[str, str] = field(default_factory=dict)
    warm_args: list[str] = field(default_factory=list)
    """Added to ``command`` for the warm runs."""
    cold_args: list[str] = field(default_factory=list)
    """Added to ``command`` for cold-start runs: drop the model after a short idle."""
    cold_env: dict[str, str] = field(default_factory=dict)
    ray_app: bool = False
    """A Ray Serve app: ``/healthz`` counts its model replicas."""
    spare_worker: bool = False
    """Its stopping model replicas leave a spare process (``SPARE_WORKER``)."""
    stop_timeout_s: float = 120
    """How long Ctrl-C may take: a Serve app deletes itself and stops Ray."""

    def ready(self) -> bool:
        """Warmed up: a Serve app runs ``MAX_REPLICAS`` model replicas."""
        return all_replicas_up(self.url) if self.ray_app else True

    @contextmanager
    def started(self, cold: bool = False) -> Iterator[None]:
        command = [*self.command, *(self.cold_args if cold else self.warm_args)]
        env = {**self.env, **(self.cold_env if cold else {})}
        log_name = f"{self.key}-{'cold' if cold else 'warm'}"
        with running(command, self.url + self.health_path, env, log_name, self.stop_timeout_s):
            yield


def servers(
    config: ServeConfig, model: Path | None = None, app_env: Mapping[str, str] | None = None
) -> dict[str, Server]:
    """The three servers, keyed by the names ``--servers`` takes.

    All serve the embedded model's converted copy, or the model directory
    ``model``: the Serve apps as their ``MODEL_ID``, transformers serve from
    its command line. ``app_env`` adds variables of the Serve apps
    (``CPU_WEIGHTS``, say)."""
    model_dir = str(model.resolve() if model else ensure_converted(config.model_cache_dir))
    app_model = model_dir if model else config.model_id
    app_env = {**({"MODEL_ID": model_dir} if model else {}), **(app_env or {})}
    layout = f"{config.max_replicas} x {config.num_cpus_per_replica:g} CPU"
    idle = {"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)}
    transformers = str(Path(sys.executable).parent / "transformers")
    return {
        "app": Server(
            "app",
            f"app, {layout}",
            ["scripts/serve.sh"],
            OURS_URL,
            "/healthz",
            app_model,
            env=app_env,
            cold_env=idle,
            ray_app=True,
            spare_worker=True,
        ),
        "baseline": Server(
            "baseline",
            f"baseline, {layout}",
            ["scripts/serve.sh", "bench.baseline_app:app"],
            OURS_URL,
            "/healthz",
            app_model,
            env=app_env,
            cold_env=idle,
            ray_app=True,
        ),
        # Given a model on its command line, transformers serve loads it at
        # start and keeps it. Without one, it loads the model a request names
        # and unloads it after --model-timeout idle seconds: its own scale to
        # zero, which the cold-start runs measure.
        "transformers": Server(
            "transformers",
            "transformers serve --cb",
            [transformers, "serve", "--continuous-batching", "--host=127.0.0.1", "--port=8001"],
            THEIRS_URL,
            "/health",
            model_dir,
            env={"HF_HUB_OFFLINE": "1"},
            warm_args=[model_dir],
            cold_args=[f"--model-timeout={IDLE_TIMEOUT_S}"],
            # Its continuous-batching thread can keep it from exiting on Ctrl-C.
            stop_timeout_s=15,
        ),
    }


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


def completion_body(server: Server, index: int, max_tokens: int) -> dict:
    return {
        "model": server.model,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The closed-loop load of :func:`measure`, for a benchmark's command line."""
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="measurements per server start")


def measure(server: Server, args: argparse.Namespace) -> list[Outcome]:
    """Start ``server``, warm it up, and drive ``args.runs`` loads through it."""
    with server.started():
        warm_up(server, args.concurrency)
        outcomes = []
        for _ in range(args.runs):
            outcomes.append(drive(server, args.concurrency, args.requests, args.max_tokens))
            print(outcomes[-1].row(), flush=True)
    return outcomes


def taking_turns(first: str, second: str, rounds: int) -> Iterator[str]:
    """``first, second, second, first, ...`` for ``rounds`` rounds: a steady
    drift in this machine's speed then weighs on both sides alike, where one
    turn each would put it all in their ratio."""
    for round_ in range(rounds):
        yield from (first, second) if round_ % 2 == 0 else (second, first)


def mean_tokens_per_s(outcomes: list[Outcome]) -> float:
    return sum(o.tokens_per_s for o in outcomes) / len(outcomes)


def drive(
    server: Server,
    concurrency: int,
    total: int,
    max_tokens: int,
    extra: Mapping[str, Any] | None = None,
) -> Outcome:
    """``total`` whole completions from ``concurrency`` closed-loop clients,
    each body with the fields ``extra`` adds."""

    def one(index: int) -> tuple[float, int] | None:
        body = {**completion_body(server, index, max_tokens), **(extra or {})}
        started = time.perf_counter()
        try:
            response = requests.post(f"{server.url}/v1/completions", json=body, timeout=600)
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
        server.name,
        concurrency,
        total,
        sum(tokens for _, tokens in answered),
        seconds,
        [latency for latency, _ in answered],
        failed=total - len(answered),
    )


@contextmanager
def running(
    command: list[str],
    health_url: str,
    env: dict[str, str],
    log_name: str = "",
    stop_timeout_s: float = 120,
) -> Iterator[None]:
    """A server in its own process group, up until Ctrl-C-like SIGINT stops it
    (or, after ``stop_timeout_s``, SIGKILL). Its output goes to
    ``test-artifacts/bench-<log_name>.log``."""
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    log_path = REPO / "test-artifacts" / f"bench-{log_name or Path(command[0]).name}.log"
    log = open(log_path, "wb")  # noqa: SIM115
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
            process.wait(timeout=stop_timeout_s)
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


def warm_up(server: Server, concurrency: int) -> None:
    """Bursts until the server is warm: the app's autoscaler adds replicas only
    under sustained load, and the steady state under load is what is compared."""
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    drive(server, concurrency, concurrency, 16)
    while not server.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not reach its steady state while warming up")
        drive(server, concurrency, concurrency, 32)


@dataclass(frozen=True)
class Streamed:
    """One streamed completion: when it was sent (Unix time) and how long the
    first piece of text (or the finish, when the first token ended it) and the
    whole stream took."""

    sent: float
    first_token_s: float
    total_s: float


def stream(server: Server, index: int, max_tokens: int) -> Streamed:
    """Stream one completion to its end, as a client would, timing its first token."""
    body = {**completion_body(server, index, max_tokens), "stream": True}
    sent, started = time.time(), time.perf_counter()
    first = None
    with requests.post(
        f"{server.url}/v1/completions", json=body, stream=True, timeout=600
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines(decode_unicode=True):
            if first is None and line.startswith("data: {"):
                choices = json.loads(line.removeprefix("data: "))["choices"]
                if choices and (choices[0]["text"] or choices[0]["finish_reason"]):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{server.name}: the stream ended without a token")
    return Streamed(sent, first, time.perf_counter() - started)


def drive_streamed(server: Server, concurrency: int, total: int, max_tokens: int) -> list[Streamed]:
    """``total`` streamed completions from ``concurrency`` closed-loop clients."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda i: stream(server, i, max_tokens), range(total)))
