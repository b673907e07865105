"""Output tokens/s, first text and the gaps between texts under a load
of mixed prompt lengths, on CPU: the padded layout's rows in groups of about
one length (decision 0037) against one padded group, taking turns in one
process. Staggered, the common case; with
``--burst``, every request admitted in one step, as a queue is after a cold
start, where prompts admitted together go in as prefills of about one
length rather than one padded to the longest.

    python -m bench.mixed_lengths [--burst]       (--help for the knobs)

The replicas' Engine alone, on the embedded model: no Ray, no HTTP. Prints
each run, and records them in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import statistics
import time

from bench.results_file import provenance, record_section
from bench.warm_model import prompt_of, warm_model
from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.padded_rows import ROW_GROUPS

LENGTHS = (20, 40, 80, 150, 300, 600)
"""Prompt lengths in tokens, each in turn, shuffled: chat turns to short documents."""


def run(engine: Engine, prompts: list[tuple[int, ...]], every_s: float, tokens: int) -> dict:
    """Submit ``prompts`` one every ``every_s`` seconds, or all in one step
    where it is 0; the output tok/s over the whole run, the first texts,
    the gaps between each stream's pieces of text, the texts."""
    stamps: list[list[float]] = [[] for _ in prompts]
    sampling = Sampling(tokens, temperature=0.0, top_p=1.0, ignore_eos=True)
    started, futures, sent = time.perf_counter(), [], []
    with engine.together() if every_s == 0 else contextlib.nullcontext():
        for prompt, mine in zip(prompts, stamps, strict=True):
            sent.append(time.perf_counter())
            futures.append(
                engine.submit(
                    GenerationRequest(prompt, sampling),
                    on_text=lambda _, mine=mine: mine.append(time.perf_counter()),
                )
            )
            time.sleep(every_s)
    completions = [future.result(timeout=1200) for future in futures]
    seconds = time.perf_counter() - started
    gaps = [later - earlier for mine in stamps for earlier, later in itertools.pairwise(mine)]
    first = [mine[0] - at for mine, at in zip(stamps, sent, strict=True)]
    return {
        "tok_s": sum(c.completion_tokens for c in completions) / seconds,
        "median_first_s": statistics.median(first),
        "last_first_s": max(first),
        "median_gap_s": statistics.median(gaps),
        "longest_gap_s": max(gaps),
        "texts": [c.text for c in completions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--every", type=float, default=0.3, help="seconds between requests")
    parser.add_argument(
        "--burst", action="store_true", help="every request at once, admitted in one step"
    )
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens each")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each way")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the prompt lengths")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    loaded = warm_model(args.threads)
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(args.requests)]
    random.Random(args.seed).shuffle(lengths)
    prompts = [prompt_of(loaded, n, f"Request {i}. ") for i, n in enumerate(lengths)]
    every = 0.0 if args.burst else args.every
    ways = {f"{ROW_GROUPS} row groups": ROW_GROUPS, "one padded group": 1}
    rows = [
        "| rows | round | prefills | output tok/s | first text: median, last s "
        "| median gap ms | longest gap ms |",
        "|---|---|---|---|---|---|---|",
    ]
    texts = {}
    for round_ in range(1, args.rounds + 1):
        for way, groups in ways.items():
            engine = Engine(
                loaded.model, loaded.tokenizer, model_id=EMBEDDED_MODEL_ID, row_groups=groups
            )
            got = run(engine, prompts, every, args.tokens)
            engine.close()
            prefills = engine.stats.prefills  # each a group of prompts admitted together
            texts.setdefault(way, got["texts"])
            rows.append(
                f"| {way} | {round_} | {prefills} | {got['tok_s']:.1f} "
                f"| {got['median_first_s']:.2f}, {got['last_first_s']:.2f} "
                f"| {got['median_gap_s'] * 1000:.0f} | {got['longest_gap_s'] * 1000:.0f} |"
            )
            print(rows[-1], flush=True)
    same = "the same" if len({tuple(t) for t in texts.values()}) == 1 else "NOT the same"
    print(f"Texts: {same} either way.")
    arriving = "all admitted in one step" if args.burst else f"one every {every:g} s"
    record_section(
        "A burst of mixed prompt lengths on CPU" if args.burst else "Mixed prompt lengths on CPU",
        [
            f"{provenance()}. {args.requests} greedy requests of {args.tokens} tokens, "
            f"{arriving}, each its own prompt, of {', '.join(map(str, LENGTHS))} tokens in "
            f"turn, shuffled with seed {args.seed}; the two ways take turns. First text: "
            f"from submitting to a stream's first piece of text. Texts: {same} either way.\n",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
