"""A soak: steady mixed traffic for a long while, then memory and errors reported.

    make soak             (or: python -m bench.soak --minutes 10)

Deploys the app with its defaults on a local Ray cluster (model replicas held
at MAX_REPLICAS, so the same processes are measured throughout) and keeps
``--concurrency`` closed-loop clients busy for ``--minutes``: whole and
streamed ``/generate``, ``/v1/completions`` and ``/v1/chat/completions``, and
one bad request in ten. It prints the resident memory of every replica every
``--sample-minutes`` and every unexpected answer. The baseline is the start:
memory that keeps growing under steady load is a leak. The growth in the
second half of the run against the first tells the two apart: an allocator
settling grows early and then flattens, a leak grows in both halves alike.
"""

import argparse
import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait

import psutil
import ray
import requests
from ray import serve
from ray.util.state import list_actors

from bench.local_cluster import pinned_config, start_ray
from bench.throughput import PROMPTS
from helpers.config import APP_NAME
from helpers.serve.app import build_app

BASE = "http://127.0.0.1:8000"


def replica_memory() -> dict[str, float]:
    """Resident MiB of each live Serve replica, by its actor class name and pid."""
    memory = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")]):
        if actor.class_name.startswith("ServeReplica:") and actor.pid:
            name = f"{actor.class_name.split(':')[-1]}[{actor.pid}]"
            memory[name] = psutil.Process(actor.pid).memory_info().rss / 2**20
    return memory


def request_kinds(model: str, max_tokens: int) -> list[tuple[str, str, dict, int]]:
    """(label, path, body, expected status) for each kind of request in the mix."""
    prompt = PROMPTS[0]
    generate = {"prompt": prompt, "generation_kwargs": {"max_new_tokens": max_tokens}}
    v1 = {"model": model, "max_tokens": max_tokens}
    chat = {**v1, "messages": [{"role": "user", "content": prompt}]}
    return [
        ("generate", "/generate", generate, 200),
        ("generate streamed", "/generate", {**generate, "stream": True}, 200),
        ("completions", "/v1/completions", {**v1, "prompt": prompt}, 200),
        ("completions streamed", "/v1/completions", {**v1, "prompt": prompt, "stream": True}, 200),
        ("chat", "/v1/chat/completions", chat, 200),
        ("chat streamed", "/v1/chat/completions", {**chat, "stream": True}, 200),
        ("generate", "/generate", generate, 200),
        ("completions", "/v1/completions", {**v1, "prompt": prompt}, 200),
        ("chat", "/v1/chat/completions", chat, 200),
        (
            "bad temperature",
            "/generate",
            {"prompt": "a", "generation_kwargs": {"temperature": 9}},
            400,
        ),
    ]


def memory_trend(series: list[float | None]) -> str:
    """A replica's samples, and its growth in each half of the run; a sample
    of None means the replica was gone (restarted)."""
    shown = " ".join("gone" if mib is None else f"{mib:.0f}" for mib in series)
    if None in series or len(series) < 3:
        return shown
    middle = len(series) // 2
    first, second = series[middle] - series[0], series[-1] - series[middle]
    return f"{shown} (first half {first:+.0f}, second half {second:+.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-minutes", type=float, default=1.0)
    args = parser.parse_args()

    config = pinned_config()
    start_ray()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    kinds = itertools.cycle(request_kinds(config.model_id, args.max_tokens))
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []

    def client(_: int) -> None:
        while time.monotonic() < deadline:
            label, path, body, expected = next(kinds)
            try:
                reply = requests.post(f"{BASE}{path}", json=body, timeout=600)
            except requests.RequestException as err:
                unexpected.append(f"{label}: {err!r}")
                continue
            outcomes[f"{label}: {reply.status_code}"] += 1
            # A stream that failed midway still has status 200: it must end in [DONE].
            cut_short = body.get("stream") and not reply.text.rstrip().endswith("data: [DONE]")
            if reply.status_code != expected or (expected == 200 and cut_short):
                unexpected.append(f"{label}: HTTP {reply.status_code} {reply.text[-200:]!r}")

    requests.post(f"{BASE}/generate", json={"prompt": "warm up"}, timeout=600)
    samples = [replica_memory()]
    started = time.monotonic()
    deadline = started + 60 * args.minutes  # the load itself lasts --minutes
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        clients = [pool.submit(client, index) for index in range(args.concurrency)]
        while wait(clients, timeout=60 * args.sample_minutes).not_done:
            samples.append(replica_memory())
        for finished in clients:
            finished.result()
    samples.append(replica_memory())
    print(
        f"soak: {(time.monotonic() - started) / 60:.1f} min, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, replicas {config.max_replicas}"
    )
    print(f"  resident MiB every {args.sample_minutes:g} min, start to end:")
    for name in sorted(samples[0]):
        print(f"  {name}: {memory_trend([sample.get(name) for sample in samples])}")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome}: {count}")
    print(f"  unexpected answers: {len(unexpected)}")
    for line in unexpected[:50]:
        print(f"    {line}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
