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

The servers take turns, app then transformers, then transformers then app
(``--rounds``, 2 by default): this machine's speed drifts by up to a third
over minutes, which in one turn each would land in the ratio; in this order a
steady drift cancels out. The ratio is of the mean tokens/s of each.
"""

import argparse

from bench.results_file import provenance, record_section
from bench.servers import HEADER, Outcome, Server, drive, servers, warm_up
from helpers.config import ServeConfig


def measure(server: Server, args: argparse.Namespace) -> list[Outcome]:
    with server.started():
        warm_up(server, args.concurrency)
        outcomes = []
        for _ in range(args.runs):
            outcomes.append(drive(server, args.concurrency, args.requests, args.max_tokens))
            print(outcomes[-1].row(), flush=True)
    return outcomes


def mean_tokens_per_s(outcomes: list[Outcome]) -> float:
    return sum(o.tokens_per_s for o in outcomes) / len(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="measurements per server start")
    parser.add_argument(
        "--rounds", type=int, default=2, help="turns of each server, in the order ABBA..."
    )
    args = parser.parse_args()
    both = servers(ServeConfig.from_env())
    print(HEADER, flush=True)
    ours: list[Outcome] = []
    theirs: list[Outcome] = []
    for round_ in range(args.rounds):
        order = ["app", "transformers"] if round_ % 2 == 0 else ["transformers", "app"]
        for key in order:
            (ours if key == "app" else theirs).extend(measure(both[key], args))
    ratio = mean_tokens_per_s(ours) / mean_tokens_per_s(theirs)
    summary = (
        f"app / transformers serve --continuous-batching = {ratio:.2f}x output tokens/s "
        f"(means of {len(ours)} measurements each, servers taking turns)"
    )
    print(summary)
    write_results([*ours, *theirs], summary, args)


def write_results(outcomes: list[Outcome], summary: str, args: argparse.Namespace) -> None:
    record_section(
        "Head to head",
        [
            f"{provenance()}. {args.requests} requests at concurrency {args.concurrency}, "
            f"{args.max_tokens}-token greedy completions through `/v1/completions`, one "
            "server at a time.\n",
            HEADER,
            *(o.row() for o in outcomes),
            f"\n{summary}.",
        ],
    )


if __name__ == "__main__":
    main()
