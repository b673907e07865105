"""What top_p costs per sampled token: the nucleus found with ``topk`` against
the whole vocabulary sorted, in the same run.

    python -m bench.sampling_speed --threads 2      (--help for the knobs)

The embedded model's engine (as ``bench.engine_direct`` loads it) decodes
``--batch`` seeded requests with the kit's default ``TEMPERATURE`` and
``TOP_P``; the rows of logits its sampler is given are kept. Then:

1. each kept row's ``Sampler.pick`` is timed both ways (``_nucleus``, the
   product's, and ``_nucleus_sorted``, the rule it replaced, swapped in for
   it), in turns, and the probabilities each gives are compared bit for bit;
2. the engine decodes the same requests end to end, each way, in turns
   (sort, topk, topk, sort: this machine's speed drifts over minutes), and
   the output tokens/s and whether the texts match are printed.

Records the figures in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bench.results_file import provenance, record_section
from helpers.config import ServeConfig
from helpers.engine import sampling
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.sampling import Sampler

TITLE = "top_p by topk against the full sort"


@contextmanager
def sorting(full_sort: bool) -> Iterator[None]:
    """The sampler with the rule it had before ``topk``, while inside."""
    fast = sampling._nucleus
    if full_sort:
        sampling._nucleus = sampling._nucleus_sorted
    try:
        yield
    finally:
        sampling._nucleus = fast


def requests(engine: Engine, config: ServeConfig, batch: int, tokens: int) -> list:
    return [
        GenerationRequest(
            engine.format_prompt(f"Tell a long story about the number {i}.", "auto"),
            Sampling(tokens, config.temperature, config.top_p, seed=i, ignore_eos=True),
        )
        for i in range(batch)
    ]


def kept_rows(engine: Engine, batch: list, limit: int) -> list[tuple[Sampling, torch.Tensor]]:
    """The rows of logits the sampler is given while ``batch`` decodes."""
    rows: list[tuple[Sampling, torch.Tensor]] = []
    pick = Sampler.pick

    def keeping(self: Sampler, logits: torch.Tensor) -> int:
        if len(rows) < limit:
            rows.append((self.sampling, logits.clone()))
        return pick(self, logits)

    Sampler.pick = keeping  # type: ignore[method-assign]
    try:
        engine.generate(batch)
    finally:
        Sampler.pick = pick  # type: ignore[method-assign]
    return rows


def per_row_ms(rows: list[tuple[Sampling, torch.Tensor]], full_sort: bool) -> float:
    pickers = [Sampler(s, "cpu", ()) for s, _ in rows]
    with sorting(full_sort):
        started = time.perf_counter()
        for picker, (_, logits) in zip(pickers, rows, strict=True):
            picker.pick(logits)
        return (time.perf_counter() - started) / len(rows) * 1e3


def probabilities(rows: list[tuple[Sampling, torch.Tensor]], full_sort: bool) -> tuple[list, int]:
    """What each row's sampler hands torch.multinomial, and how many rows the
    full sort decided."""
    sort, sorted_rows = sampling._nucleus_sorted, []

    def counting(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        sorted_rows.append(1)
        return sort(probs, top_p)

    sampling._nucleus_sorted = counting
    try:
        with sorting(full_sort):
            return [Sampler(s, "cpu", ())._probabilities(x) for s, x in rows], len(sorted_rows)
    finally:
        sampling._nucleus_sorted = sort


def decode(engine: Engine, batch: list, full_sort: bool) -> tuple[float, list[str]]:
    with sorting(full_sort):
        started = time.perf_counter()
        completions = engine.generate(batch)
        seconds = time.perf_counter() - started
    return sum(c.completion_tokens for c in completions) / seconds, [c.text for c in completions]


def in_turns(measure: Callable[[bool], float], rounds: int) -> dict[bool, list[float]]:
    """``measure(full_sort)`` sort, topk, topk, sort, ``rounds`` times over."""
    figures: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for full_sort in (True, False, False, True):
            figures[full_sort].append(measure(full_sort))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=512, help="rows of logits kept and timed")
    parser.add_argument("--rounds", type=int, default=1, help="turns of sort, topk, topk, sort")
    args = parser.parse_args()
    config = ServeConfig.from_env()
    engine = Engine.load(
        config.model_id,
        config.model_cache_dir,
        cpu_threads=args.threads,
        max_batch_size=args.batch,
    )
    warm_up = engine.format_prompt("Hello.", "auto")
    engine.generate([GenerationRequest(warm_up, Sampling(8, 0.0, 1.0))])
    if engine.tuned is not None:  # the prepacking finishes once the warm-up ends
        engine.tuned.result()
    batch = requests(engine, config, args.batch, args.max_tokens)
    rows = kept_rows(engine, batch, args.rows)

    (fast, sorted_rows), (full, _) = probabilities(rows, False), probabilities(rows, True)
    same = sum(
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        for a, b in zip(fast, full, strict=True)
    )
    nuclei = sorted(int((p > 0).sum()) for p in fast)
    ms = in_turns(lambda full_sort: per_row_ms(rows, full_sort), args.rounds * 2)
    sort_ms, topk_ms = statistics.median(ms[True]), statistics.median(ms[False])
    texts: dict[bool, list[str]] = {}

    def rate(full_sort: bool) -> float:
        tok_s, texts[full_sort] = decode(engine, batch, full_sort)
        return tok_s

    rates = in_turns(rate, args.rounds)
    sort_rate, topk_rate = statistics.mean(rates[True]), statistics.mean(rates[False])
    vocabulary = rows[0][1].shape[-1]
    lines = [
        f"{provenance()}. The embedded model, {args.batch} seeded requests of "
        f"{args.max_tokens} tokens (ignore_eos) at TEMPERATURE {config.temperature}, "
        f"TOP_P {config.top_p}; {len(rows)} of the rows of logits (vocabulary {vocabulary}) "
        "their sampler was given.",
        "",
        f"Nucleus sizes over those rows: median {nuclei[len(nuclei) // 2]}, "
        f"90th percentile {nuclei[len(nuclei) * 9 // 10]}, largest {nuclei[-1]}. "
        f"Rows whose cut topk left to the full sort: {sorted_rows}. Probabilities handed to "
        f"torch.multinomial bit-identical both ways: {same} of {len(rows)} rows.",
        "",
        "| what | full sort | topk | speed-up |",
        "|---|---|---|---|",
        f"| `Sampler.pick` per row, ms (median of {len(ms[True])} passes) "
        f"| {sort_ms:.3f} | {topk_ms:.3f} | {sort_ms / topk_ms:.1f}x |",
        f"| engine, output tok/s (mean of {len(rates[True])} runs each) "
        f"| {sort_rate:.1f} | {topk_rate:.1f} | {topk_rate / sort_rate:.2f}x |",
        "",
        f"Runs, tok/s: sort {', '.join(f'{r:.1f}' for r in rates[True])}; "
        f"topk {', '.join(f'{r:.1f}' for r in rates[False])}. Same completions both ways: "
        f"{'yes' if texts[True] == texts[False] else 'NO'}.",
    ]
    print("\n".join(lines))
    record_section(TITLE, lines)


if __name__ == "__main__":
    main()
