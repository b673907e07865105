"""What the kit's LLM metrics cost: the app with ``LLM_METRICS=on`` against
``off``, output tokens/s at concurrency 16, the two taking turns.

    python -m bench.metrics_cost        (--help for the knobs)

Each pass starts ``make serve``'s app afresh with one setting (``bench/servers.py``),
warms it up, and drives ``--requests`` greedy completions through
``/v1/completions``; the settings alternate ABBA... so that a slow spell of the
host weighs on both. One unmeasured pass comes first, so that the run's first
start counts for neither setting: a first start can run at a fraction of the
speed of the next ones. Prints each pass, then the ratio of the means and the
cost (one less the ratio) against ``--budget``, and appends them to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses

from bench.results_file import provenance, record_section
from bench.servers import HEADER, Outcome, add_load_options, mean_tokens_per_s, measure, servers
from helpers.config import ServeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_options(parser)
    parser.add_argument("--passes", type=int, default=3, help="server starts per setting")
    parser.add_argument("--budget", type=float, default=0.03, help="the most the metrics may cost")
    args = parser.parse_args()
    app = servers(ServeConfig.from_env())["app"]
    setting = {
        value: dataclasses.replace(
            app, name=f"{app.name}, LLM_METRICS={value}", env={**app.env, "LLM_METRICS": value}
        )
        for value in ("on", "off")
    }
    print(HEADER, flush=True)
    print("(unmeasured: the run's first start)", flush=True)
    measure(setting["off"], args)
    outcomes: dict[str, list[Outcome]] = {"on": [], "off": []}
    for turn in range(2 * args.passes):
        value = "on" if turn % 4 in (0, 3) else "off"  # on off off on on off ...
        outcomes[value].extend(measure(setting[value], args))
    ratio = mean_tokens_per_s(outcomes["on"]) / mean_tokens_per_s(outcomes["off"])
    cost = 1 - ratio
    verdict = "met" if cost <= args.budget else "missed"
    failed = sum(o.failed for o in [*outcomes["on"], *outcomes["off"]])
    summary = (
        f"LLM_METRICS on / off = {ratio:.3f}x output tokens/s (means of {args.passes * args.runs} "
        f"measurements each, taking turns): cost {cost:+.1%}, budget {args.budget:.0%}: "
        f"{verdict}, {failed} failed"
    )
    print(summary)
    record_section(
        "Cost of the LLM metrics",
        [
            f"{provenance()}. {args.requests} requests at concurrency {args.concurrency}, "
            f"{args.max_tokens}-token greedy completions through `/v1/completions`.\n",
            HEADER,
            *(o.row() for o in [*outcomes["on"], *outcomes["off"]]),
            f"\n{summary}.",
        ],
    )


if __name__ == "__main__":
    main()
