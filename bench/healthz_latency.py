"""``/healthz`` latency of ``make serve``'s app, at zero model replicas and warm.

    python -m bench.healthz_latency            (--help for the knobs)

A load balancer probes ``/healthz`` every few seconds, so it must answer fast
whether or not a model replica runs (it never wakes one). Sequential GETs over
HTTP keep-alive, as a prober does; prints p50, p95 and max for each state,
against the baseline of the same GETs to a path the ingress refuses at once
(a 404: the proxy and the ingress, no work), and the target's verdict.
"""

import argparse
import time

import requests

from bench.servers import OURS_URL, running
from bench.throughput import PROMPTS
from bench.ttft import percentile
from helpers.config import ServeConfig

TARGET_P50_S = 0.010


def probe(
    session: requests.Session, count: int, path: str = "/healthz", status: int = 200
) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        answer = session.get(f"{OURS_URL}{path}", timeout=10)
        seconds.append(time.perf_counter() - started)
        if answer.status_code != status:
            raise RuntimeError(f"GET {path} answered {answer.status_code}, not {status}")
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
        floor = probe(session, args.probes, "/no-such-path", 404)
        report("baseline: a 404", floor)
        cold = probe(session, args.probes)
        report("zero model replicas", cold)
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        session.post(f"{OURS_URL}/v1/completions", json=body, timeout=300).raise_for_status()
        warm = probe(session, args.probes)
        report("one replica, idle", warm)
    worst = max(percentile(cold, 0.5), percentile(warm, 0.5))
    verdict = "met" if worst < TARGET_P50_S else "NOT met"
    print(
        f"p50 under {1000 * TARGET_P50_S:.0f} ms: {verdict} ({1000 * worst:.1f} ms at worst, "
        f"{1000 * (worst - percentile(floor, 0.5)):.1f} ms over the 404's)"
    )


if __name__ == "__main__":
    main()
