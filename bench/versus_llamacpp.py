"""The app as ``make serve`` runs it against llama.cpp's ``llama-server``, one user and sixteen.

    python -m bench.versus_llamacpp          (--help for the knobs)
    make bench-versus-llamacpp

Both serve the embedded model on loopback, one at a time on the machine: the
app its converted copy (its linear layers on the GGUF's 4-bit blocks),
``llama-server`` the GGUF file itself (:mod:`bench.llama_server`, built once
from source). Each is started, warmed up (the app until its autoscaler has
brought the model up to ``MAX_REPLICAS``), then given closed-loop loads through
``POST /v1/completions`` at each concurrency: the prompts of
``bench/throughput.py``, greedy, ``max_tokens`` new tokens, no stop sequence.
Output tokens are each server's own ``usage.completion_tokens``.

The servers take turns, app then llama-server, then llama-server then app
(``--rounds``, 2 by default), so that a steady drift of this machine's speed
cancels out; each ratio is of the mean tokens/s of each. Prints every
measurement, then a table of the ratios against the targets of issue 28 (at
least 0.8x at concurrency 1 and 1.0x at 16), and records it in
``bench/RESULTS.md``. Where CMake or a compiler is missing, it says what to
install and exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.llama_server import BuildToolsMissing, ensure_built
from bench.llama_server import server as llama_server
from bench.results_file import provenance, record_section
from bench.servers import (
    HEADER,
    Outcome,
    Server,
    drive,
    mean_tokens_per_s,
    servers,
    taking_turns,
    warm_up,
)
from helpers.config import ServeConfig

TARGETS = {1: 0.8, 16: 1.0}
"""Concurrency: the least ratio of the app's tokens/s to llama-server's (issue 28)."""

REQUESTS = {1: 8, 16: 48}
"""Requests per measurement at each concurrency: a few seconds of decoding each."""

WARM_UP_CONCURRENCY = 16


def measure(server: Server, concurrencies: Sequence[int], max_tokens: int) -> list[Outcome]:
    """Start ``server``, warm it up, and drive one load at each concurrency."""
    outcomes = []
    with server.started():
        warm_up(server, WARM_UP_CONCURRENCY)
        for concurrency in concurrencies:
            requests = REQUESTS.get(concurrency, 3 * concurrency)
            outcomes.append(drive(server, concurrency, requests, max_tokens))
            print(outcomes[-1].row(), flush=True)
    return outcomes


def ratio_table(ours: list[Outcome], theirs: list[Outcome], concurrencies: Sequence[int]) -> str:
    """Mean tokens/s of each server at each concurrency, their ratio and the target."""
    lines = [
        "| concurrency | app tok/s | llama-server tok/s | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for concurrency in concurrencies:
        app = mean_tokens_per_s([o for o in ours if o.concurrency == concurrency])
        llama = mean_tokens_per_s([o for o in theirs if o.concurrency == concurrency])
        ratio = app / llama
        target = TARGETS.get(concurrency)
        verdict = f">= {target:g}x: {'met' if ratio >= target else 'missed'}" if target else ""
        lines.append(f"| {concurrency} | {app:.1f} | {llama:.1f} | {ratio:.2f}x | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=sorted(TARGETS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=2, help="turns of each server, in the order ABBA..."
    )
    parser.add_argument("--threads", type=int, default=2, help="llama-server's CPU threads (-t)")
    args = parser.parse_args()
    config = ServeConfig.from_env()
    try:
        ensure_built(config)
    except BuildToolsMissing as missing:
        sys.exit(f"skipped: {missing}")
    both = {"app": servers(config)["app"], "llamacpp": llama_server(config, args.threads)}
    print(HEADER, flush=True)
    ours: list[Outcome] = []
    theirs: list[Outcome] = []
    for key in taking_turns("app", "llamacpp", args.rounds):
        outcomes = measure(both[key], args.concurrency, args.max_tokens)
        (ours if key == "app" else theirs).extend(outcomes)
    table = ratio_table(ours, theirs, args.concurrency)
    print(f"\n{table}")
    record_section(
        "Against llama-server",
        [
            f"{provenance()}. {both['app'].name} against {both['llamacpp'].name}, on the "
            f"same GGUF file; {args.max_tokens}-token greedy completions through "
            "`/v1/completions`, one server at a time, taking turns.\n",
            HEADER,
            *(o.row() for o in [*ours, *theirs]),
            "",
            table,
        ],
    )


if __name__ == "__main__":
    main()
