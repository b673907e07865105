"""Time to first token through ``/v1/completions`` streaming, warm, at concurrency 1 and 16.

    make bench-ttft       (or: python -m bench.ttft --help)

The model replicas are held at ``MAX_REPLICAS`` and warmed up first, so no
cold start is measured. Each closed-loop client streams a completion (greedy,
``--max-tokens`` tokens) and records when the first non-empty piece of text
arrived and when the stream ended. The baseline in the same run is what a
client waited before streaming existed: the whole non-streamed reply to the
same request, from the same server.
"""

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import requests
from ray import serve

from bench.local_cluster import pinned_config, start_ray
from bench.throughput import PROMPTS
from helpers.config import APP_NAME
from helpers.serve.app import build_app

URL = "http://127.0.0.1:8000/v1/completions"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(fraction * len(ordered)) - 1)]


def timed_request(model: str, index: int, max_tokens: int, stream: bool) -> float:
    """Seconds to the first piece of text (streamed) or to the whole reply."""
    body = {
        "model": model,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    with requests.post(URL, json=body, stream=stream, timeout=600) as response:
        response.raise_for_status()
        if not stream:
            response.json()
            return time.perf_counter() - started
        for line in response.iter_lines(decode_unicode=True):
            # The first chunk that carries text, or the finish (the first token was the end).
            choice = json.loads(line[6:])["choices"][0] if line.startswith("data: {") else {}
            if choice.get("text") or choice.get("finish_reason"):
                first = time.perf_counter() - started
                for _ in response.iter_lines():  # read to the end, as a client would
                    pass
                return first
    raise RuntimeError("the stream ended without a token")


def measure(model: str, concurrency: int, total: int, max_tokens: int, stream: bool) -> list:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda i: timed_request(model, i, max_tokens, stream), range(total)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    config = pinned_config()
    print(
        f"model={config.model_id} replicas={config.max_replicas} "
        f"cpus/replica={config.num_cpus_per_replica} "
        f"max_tokens={args.max_tokens} host_cpus={os.cpu_count()}"
    )
    start_ray()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    measure(config.model_id, 2, 2, 4, stream=True)  # warm-up
    print("| measure                 | concurrency | requests | p50 (s) | p95 (s) |")
    print("|-------------------------|-------------|----------|---------|---------|")
    for concurrency in args.concurrency:
        total = max(args.requests_per_client * concurrency, 4)
        p50s = {}
        for stream, label in ((True, "first token (streamed)"), (False, "whole reply (baseline)")):
            seconds = measure(config.model_id, concurrency, total, args.max_tokens, stream)
            p50s[stream] = statistics.median(seconds)
            print(
                f"| {label:<23} | {concurrency:>11} | {total:>8} | {p50s[stream]:>7.3f} "
                f"| {percentile(seconds, 0.95):>7.3f} |",
                flush=True,
            )
        print(
            f"concurrency {concurrency}: first token after {p50s[True] / p50s[False]:.1%} "
            "of the time a whole reply takes (p50)"
        )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
