"""``/healthz`` latency of ``make serve``'s app, at zero model replicas and warm.

    python -m bench.healthz_latency            (--help for the knobs)

A load balancer probes ``/healthz`` every few seconds, so it must answer fast
whether or not a model replica runs (it never wakes one). Sequential GETs over
HTTP keep-alive, as a prober does; prints p50, p95 and max for each state.
"""

import argparse
import time

import requests

from bench.servers import OURS_URL, running
from bench.throughput import PROMPTS
from bench.ttft import percentile
from helpers.config import ServeConfig


def probe(session: requests.Session, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(f"{OURS_URL}/healthz", timeout=10).raise_for_status()
        seconds.append(time.perf_counter() - started)
    return seconds


def report(state: str, seconds: list[float]) -> None:
    print(
        f"| {state:<22} | {len(seconds):>5} | {1000 * percentile(seconds, 0.5):>7.1f} | "
        f"{1000 * percentile(seconds, 0.95):>7.1f} | {1000 * max(seconds):>7.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    model = ServeConfig.from_env().model_id
    with running(["scripts/serve.sh"], f"{OURS_URL}/healthz", {}), requests.Session() as session:
        print("| state                  | GETs  | p50 ms  | p95 ms  | max ms  |")
        print("|------------------------|-------|---------|---------|---------|")
        probe(session, 10)  # connection and code paths warm
        report("zero model replicas", probe(session, args.probes))
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        session.post(f"{OURS_URL}/v1/completions", json=body, timeout=300).raise_for_status()
        report("one replica, idle", probe(session, args.probes))


if __name__ == "__main__":
    main()
