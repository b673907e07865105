"""Every figure of the performance issue in one run: the app against the
walkthrough-style baseline and ``transformers serve --continuous-batching``.

    make bench            (= python -m bench.compare; --help for the knobs)

Each server runs alone on the machine (see ``bench/servers.py``), twice:

1. warm, with its defaults: after a warm-up (the app until it runs
   ``MAX_REPLICAS`` replicas), closed-loop whole completions through
   ``/v1/completions`` at each ``--concurrency``: output tokens/s from each
   server's own ``usage.completion_tokens``, p50 and p95 latency, failures;
   then streamed completions at each ``--ttft-concurrency``: time to first
   token, p50 and p95.
2. cold, with a short idle timeout (``bench/servers.py``): ``--cold-cycles``
   first tokens after the model was dropped, broken down for the Serve apps
   (``bench/cold_start.py``).

Prints as it goes, then appends every table, the ratios and the issue's
targets (met or missed) to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from bench import cold_start
from bench.results_file import provenance, record_section
from bench.servers import HEADER, Outcome, Server, drive, drive_streamed, servers, warm_up
from bench.ttft import percentile
from helpers.config import ServeConfig

TTFT_HEADER = "| server | c | streams | first token p50 s | p95 s |\n|---|---|---|---|---|"


@dataclass(frozen=True)
class Ttft:
    server: str
    concurrency: int
    first_token_s: list[float]

    def row(self) -> str:
        values = self.first_token_s
        return (
            f"| {self.server} | {self.concurrency} | {len(values)} | "
            f"{statistics.median(values):.3f} | {percentile(values, 0.95):.3f} |"
        )


@dataclass
class Figures:
    load: list[Outcome]
    ttft: list[Ttft]
    cold: list[cold_start.ColdStart]


def requests_at(concurrency: int) -> int:
    """Three per client, at least 8, at most 64: 48 at concurrency 16, as the issue asks."""
    return min(max(3 * concurrency, 8), 64)


def measure(server: Server, args: argparse.Namespace) -> Figures:
    figures = Figures([], [], [])
    with server.started():
        # Highest concurrency first: the warm-up brings a Serve app to
        # MAX_REPLICAS, and load keeps them up. Going upwards instead, the
        # autoscaler stops a replica during the light levels and the heavy ones
        # would then measure a cold start.
        warm_up(server, max(args.concurrency))
        for concurrency in sorted(args.concurrency, reverse=True):
            outcome = drive(server, concurrency, requests_at(concurrency), args.max_tokens)
            figures.load.append(outcome)
            print(outcome.row(), flush=True)
        for concurrency in sorted(args.ttft_concurrency, reverse=True):
            streams = drive_streamed(server, concurrency, 2 * max(concurrency, 4), args.max_tokens)
            figures.ttft.append(Ttft(server.name, concurrency, [s.first_token_s for s in streams]))
            print(figures.ttft[-1].row(), flush=True)
    if args.cold_cycles:
        figures.cold = cold_start.measure(server, args.cold_cycles)
    return figures


def ratios(by_server: dict[str, Figures]) -> list[str]:
    """The app's output tokens/s over each other server's, at each concurrency."""
    app = by_server.get("app")
    if app is None:
        return []
    lines = []
    for name, other in by_server.items():
        if name == "app":
            continue
        pairs = zip(app.load, other.load, strict=True)
        cells = ", ".join(
            f"c{ours.concurrency} {ours.tokens_per_s / theirs.tokens_per_s:.2f}x"
            for ours, theirs in pairs
        )
        lines.append(f"- app / {other.load[0].server}: {cells}")
    return lines


def targets(by_server: dict[str, Figures]) -> list[str]:
    """The issue's CPU targets that this run measured, each met or missed."""
    app = by_server.get("app")
    if app is None:
        return []

    def at(figures: Figures, concurrency: int) -> Outcome | None:
        return next((o for o in figures.load if o.concurrency == concurrency), None)

    checks = []
    ours16 = at(app, 16)
    for name, factor in (("transformers", 1.2), ("baseline", 6.0)):
        theirs16 = at(by_server[name], 16) if name in by_server else None
        if ours16 and theirs16:
            ratio = ours16.tokens_per_s / theirs16.tokens_per_s
            failed = ours16.failed + theirs16.failed
            checks.append(
                (
                    f"c16 tok/s >= {factor}x {theirs16.server}, no failure",
                    ratio >= factor and not failed,
                    f"{ratio:.2f}x, {failed} failed",
                )
            )
    ttft1 = next((t for t in app.ttft if t.concurrency == 1), None)
    if ttft1:
        p50 = statistics.median(ttft1.first_token_s)
        checks.append(("warm first token p50 at c1 < 150 ms", p50 < 0.150, f"{p50 * 1000:.0f} ms"))
    if app.cold:
        worst = max(c.cold_s for c in app.cold)
        checks.append(("cold start to first token < 6 s", worst < 6, f"{worst:.2f} s (worst)"))
        weights = [c.parts[cold_start.PARTS.index("weights")] for c in app.cold if c.parts]
        if weights:
            checks.append(("of which weights < 1 s", max(weights) < 1, f"{max(weights):.2f} s"))
    return [
        "| target | met | measured |",
        "|---|---|---|",
        *(f"| {what} | {'yes' if met else 'no'} | {value} |" for what, met, value in checks),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=("app", "baseline", "transformers"),
        default=["app", "baseline", "transformers"],
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--ttft-concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cold-cycles", type=int, default=3)
    args = parser.parse_args()
    available = servers(ServeConfig.from_env())
    by_server = {}
    for name in args.servers:
        print(f"\n{available[name].name}\n{HEADER}", flush=True)
        by_server[name] = measure(available[name], args)
    everything = list(by_server.values())
    lines = [
        f"{provenance()}. Greedy completions of at most {args.max_tokens} tokens through "
        "`/v1/completions`, one server at a time; requests per concurrency: "
        + ", ".join(f"{c}: {requests_at(c)}" for c in args.concurrency)
        + ".\n",
        HEADER,
        *(o.row() for figures in everything for o in figures.load),
        "",
        *ratios(by_server),
        "",
        TTFT_HEADER,
        *(t.row() for figures in everything for t in figures.ttft),
    ]
    if args.cold_cycles:
        lines += [
            "",
            cold_start.HEADER,
            *(c.row() for figures in everything for c in figures.cold),
        ]
    lines += ["", *targets(by_server)]
    print("\n".join(lines))
    record_section("Full comparison", lines)


if __name__ == "__main__":
    main()
