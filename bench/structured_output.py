"""What structured output costs: the app at concurrency 16 with a JSON schema
on every request, against the same load with none.

    python -m bench.structured_output        (--help for the knobs)
    make bench-structured

One start of ``make serve``'s app, warmed up until its autoscaler has brought
the model up to ``MAX_REPLICAS``; then closed-loop loads through
``POST /v1/completions`` with the prompts of ``bench/throughput.py``, greedy,
``max_tokens`` new tokens. The two loads take turns, free then held, then
held then free (``--rounds``, 3 by default, so three passes each), and the
ratio is of their mean output tokens/s, against issue 25's target of at
least 0.8x.

The schema asks for more items than ``max_tokens`` can hold, so every held
completion runs to ``max_tokens`` as the free ones (``ignore_eos``) do: both
sides decode the same number of tokens per request, and the ratio is the cost
per token of computing and applying the masks. Records the table in
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse

from bench.results_file import provenance, record_section
from bench.servers import HEADER, Outcome, drive, mean_tokens_per_s, servers, taking_turns, warm_up
from helpers.config import ServeConfig

TARGET = 0.8
"""The least ratio of held to free output tokens/s (issue 25)."""

STEPS = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "steps": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "action": {"type": "string", "maxLength": 60},
                    "minutes": {"type": "integer", "minimum": 0},
                    "optional": {"type": "boolean"},
                },
                "required": ["action", "minutes", "optional"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "steps"],
    "additionalProperties": False,
}
"""A plan of at least 40 steps: longer than any ``max_tokens`` the benchmark uses."""

LOADS = {
    "free": {"ignore_eos": True},
    "held": {
        "ignore_eos": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "plan", "schema": STEPS, "strict": True},
        },
    },
}
"""The fields each load adds to every request."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each load, ABBA...")
    args = parser.parse_args()
    app = servers(ServeConfig.from_env())["app"]
    outcomes: dict[str, list[Outcome]] = {"free": [], "held": []}
    print(HEADER, flush=True)
    with app.started():
        warm_up(app, args.concurrency)
        for load in taking_turns("free", "held", args.rounds):
            outcome = drive(app, args.concurrency, args.requests, args.max_tokens, LOADS[load])
            outcome.server = f"{app.name}, {load}"
            outcomes[load].append(outcome)
            print(outcome.row(), flush=True)
    table = ratio_table(outcomes)
    print(f"\n{table}")
    record_section(
        "Structured output's cost",
        [
            f"{provenance()}. {args.requests} greedy {args.max_tokens}-token completions "
            f"at concurrency {args.concurrency} through `/v1/completions`, every one of a "
            "load held to a JSON schema or none, the loads taking turns on one warm app.\n",
            HEADER,
            *(o.row() for o in [*outcomes["free"], *outcomes["held"]]),
            "",
            table,
        ],
    )


def ratio_table(outcomes: dict[str, list[Outcome]]) -> str:
    """Mean tokens/s and tokens per request of each load, their ratio and the target."""
    free, held = (mean_tokens_per_s(outcomes[load]) for load in ("free", "held"))
    ratio = held / free
    tokens = {load: _tokens_per_request(outcomes[load]) for load in outcomes}
    return "\n".join(
        [
            "| load | tok/s (mean) | tokens per request | failed |",
            "|---|---|---|---|",
            *(
                f"| {load} | {mean_tokens_per_s(outcomes[load]):.1f} | {tokens[load]:.1f} | "
                f"{sum(o.failed for o in outcomes[load])} |"
                for load in ("free", "held")
            ),
            "",
            f"held / free = **{ratio:.2f}x** (target >= {TARGET:g}x: "
            f"{'met' if ratio >= TARGET else 'missed'})",
        ]
    )


def _tokens_per_request(outcomes: list[Outcome]) -> float:
    answered = sum(o.requests - o.failed for o in outcomes)
    return sum(o.output_tokens for o in outcomes) / max(answered, 1)


if __name__ == "__main__":
    main()
