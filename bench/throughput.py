"""Output tokens/s through HTTP ``/generate``: the app against a walkthrough-style baseline.

    make bench-generate   (or: python -m bench.throughput --help)

Both servers run in turn on one local Ray cluster with the same replicas
(fixed at MAX_REPLICAS, so autoscaling does not blur the numbers), the same
prompts, greedy decoding and the same ``max_new_tokens``. Only the model
deployment differs: batched (the app) or one ``generate`` call per request
(the baseline). Figures are printed as a table with the ratio.
"""

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import requests
from ray import serve

from bench.local_cluster import pinned_config, start_ray
from bench.one_by_one_server import OneByOneServer
from helpers.config import APP_NAME, ServeConfig
from helpers.engine.engine import load_tokenizer
from helpers.serve.app import build_app
from helpers.serve.model_server import LLMServer

URL = "http://127.0.0.1:8000/generate"
PROMPTS = [
    "Write a haiku about Ray Serve.",
    "Explain autoscaling in one paragraph.",
    "List five uses of a hammer.",
    "Describe the sea to someone who has never seen it.",
    "What makes a good unit test?",
    "Tell a short story about a robot and a cat.",
    "Summarise the plot of a heist film.",
    "Give three tips for writing clear code.",
]


@dataclass
class Result:
    server: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> str:
        p50 = statistics.median(self.latencies)
        p95 = sorted(self.latencies)[max(0, round(0.95 * len(self.latencies)) - 1)]
        return (
            f"| {self.server:<9} | {self.concurrency:>11} | {self.requests:>8} | "
            f"{self.tokens_per_s:>13.1f} | {p50:>7.2f} | {p95:>7.2f} |"
        )


def load(concurrency: int, total: int, max_new_tokens: int, count_tokens) -> tuple:
    def one(index: int) -> tuple[float, int]:
        body = {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0},
        }
        started = time.perf_counter()
        response = requests.post(URL, json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - started, count_tokens(response.json()["completions"][0])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, range(total)))
    return time.perf_counter() - started, outcomes


def measure(name: str, server: type, config: ServeConfig, args: argparse.Namespace) -> list:
    serve.run(build_app(config, server), name=APP_NAME, route_prefix="/")
    tokenizer = load_tokenizer(config.model_id, config.model_cache_dir)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    load(2, 2, 4, count_tokens)  # warm-up: replicas started, code paths compiled
    results = []
    for concurrency in args.concurrency:
        total = max(args.requests_per_client * concurrency, 4)
        seconds, outcomes = load(concurrency, total, args.max_new_tokens, count_tokens)
        results.append(
            Result(
                name,
                concurrency,
                total,
                sum(t for _, t in outcomes),
                seconds,
                [latency for latency, _ in outcomes],
            )
        )
        print(results[-1].row(), flush=True)
    serve.delete(APP_NAME)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    config = pinned_config()
    print(
        f"model={config.model_id} replicas={config.max_replicas} "
        f"cpus/replica={config.num_cpus_per_replica} "
        f"max_batch_size={config.max_batch_size} max_new_tokens={args.max_new_tokens} "
        f"host_cpus={os.cpu_count()}"
    )
    start_ray()
    print("| server    | concurrency | requests | output tok/s  | p50 (s) | p95 (s) |")
    print("|-----------|-------------|----------|---------------|---------|---------|")
    app = measure("app", LLMServer, config, args)
    baseline = measure("baseline", OneByOneServer, config, args)
    for ours, theirs in zip(app, baseline, strict=True):
        print(
            f"concurrency {ours.concurrency}: app/baseline = "
            f"{ours.tokens_per_s / theirs.tokens_per_s:.2f}x output tokens/s"
        )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
