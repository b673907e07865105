"""Cold start from zero model replicas to the first streamed token, against warm.

    python -m bench.cold_start            (--help for the knobs)

Runs ``make serve``'s app with a short idle timeout (which changes when a
replica stops, not how it starts), waits until the model is at zero replicas,
then streams one greedy completion through ``/v1/completions`` and times its
first piece of text: Serve scheduling a replica, the replica importing the
kit and loading the model, the prefill. The same request right after is the
warm figure. Repeated ``--cycles`` times.
"""

import argparse
import json
import time

import requests

from bench.throughput import PROMPTS
from bench.versus_transformers import OURS_URL, running
from helpers.config import ServeConfig

SCALE_DOWN_TIMEOUT_S = 180


def first_token_s(model: str) -> float:
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    started = time.perf_counter()
    with requests.post(
        f"{OURS_URL}/v1/completions", json={**body, "stream": True}, stream=True, timeout=300
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines(decode_unicode=True):
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                choices = json.loads(data)["choices"]
                if choices and (choices[0]["text"] or choices[0]["finish_reason"]):
                    return time.perf_counter() - started
    raise RuntimeError("the stream ended without text")


def running_replicas() -> int:
    return requests.get(f"{OURS_URL}/healthz", timeout=10).json()["model_replicas"]["running"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    model = ServeConfig.from_env().model_id
    with running(
        ["scripts/serve.sh"], f"{OURS_URL}/healthz", {"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "5"}
    ):
        print("| cycle | cold: first token (s) | warm: first token (s) |")
        print("|-------|-----------------------|-----------------------|")
        for cycle in range(1, args.cycles + 1):
            deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
            while running_replicas() > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the model did not scale to zero")
                time.sleep(1)
            time.sleep(2)  # a replica that just stopped has released its CPU
            cold, warm = first_token_s(model), first_token_s(model)
            print(f"| {cycle:>5} | {cold:>21.2f} | {warm:>21.3f} |", flush=True)


if __name__ == "__main__":
    main()
