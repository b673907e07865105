"""What a long prompt arriving costs the streams decoding beside it, on CPU:
the gaps between their pieces of text while it goes in and after it has
joined their batch, its own time to first token, and that of a short
question sent just after it. Prompts go in pieces of ``PREFILL_CHUNK``
tokens a pass, a short one goes in beside a long one's pieces (lanes), and
rows of very different lengths decode in groups of their own. Three
baselines take turns with it in the same run: one padded group, as before
groups; pieces first come, first served, as before lanes; and the whole
prompt in one pass, as before pieces.

    python -m bench.long_prompt        (--help for the knobs)

The replicas' Engine alone, on the embedded model: no Ray, no HTTP. Prints
each run, and records them in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from bench.results_file import provenance, record_section
from bench.warm_model import prompt_of, warm_model
from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.padded_rows import PREFILL_CHUNK, ROW_GROUPS

STREAMS = 4
STREAM_TOKENS = 1000
"""More than the streams decode before the long prompt is done; they are then cancelled."""
STARTED_AFTER = 10
"""Pieces each stream has sent before the long prompt is submitted."""
QUESTION = "What is the capital of France?"
QUESTION_AFTER_S = 1.0
"""Seconds after the long prompt the short question is sent."""


def run(engine: Engine, prompt: tuple[int, ...]) -> dict[str, float]:
    """Streams decode; the long prompt arrives, and a short question just
    after it; the streams are stopped once both have their 16 tokens."""
    stamps: list[list[float]] = [[] for _ in range(STREAMS)]
    sampling = Sampling(STREAM_TOKENS, temperature=0.0, top_p=1.0, ignore_eos=True)
    streams = [
        engine.submit(
            GenerationRequest(f"Count from {i} to a thousand:", sampling),
            on_text=lambda _, mine=stamps[i]: mine.append(time.perf_counter()),
        )
        for i in range(STREAMS)
    ]
    while min(map(len, stamps)) < STARTED_AFTER:
        ended = [stream for stream in streams if stream.done()]
        if ended:
            raise RuntimeError(f"a stream ended before the long prompt came: {ended[0].result()}")
        time.sleep(0.01)
    first: list[float] = []
    answered: list[float] = []
    asked_for = Sampling(16, 0.0, 1.0, ignore_eos=True)
    submitted = time.perf_counter()
    long = engine.submit(
        GenerationRequest(prompt, asked_for), on_text=lambda _: first.append(time.perf_counter())
    )
    time.sleep(QUESTION_AFTER_S)
    asked = time.perf_counter()
    question = engine.submit(
        GenerationRequest(QUESTION, asked_for),
        on_text=lambda _: answered.append(time.perf_counter()),
    )
    long.result(timeout=1200)
    question.result(timeout=1200)
    done = time.perf_counter()
    if not all(stream.cancel() for stream in streams):
        raise RuntimeError("a stream ended before the long prompt: raise STREAM_TOKENS")
    going_in, beside = [], []
    for mine in stamps:
        for earlier, later in itertools.pairwise(mine):
            if submitted <= later <= first[0]:
                going_in.append(later - earlier)
            elif first[0] < earlier and later <= done:
                beside.append(later - earlier)
    return {
        "first_token_s": first[0] - submitted,
        "question_first_token_s": answered[0] - asked,
        "longest_gap_s": max(going_in),
        "median_gap_s": statistics.median(going_in),
        "median_gap_after_s": statistics.median(beside),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2000, 6000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="turns of each way")
    args = parser.parse_args()
    loaded = warm_model(args.threads)
    rows = [
        "| prompt tokens | prefill | round | streams' longest gap ms | median gap ms "
        "| median gap after it joined ms | its first token s | the question's first token s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tokens in args.tokens:
        prompt = prompt_of(loaded, tokens)
        ways = {  # prompt tokens a pass prefills, past how many a prompt is long, row groups
            f"pieces of {PREFILL_CHUNK}, lanes, row groups": (PREFILL_CHUNK, None, ROW_GROUPS),
            f"pieces of {PREFILL_CHUNK}, lanes, one group": (PREFILL_CHUNK, None, 1),
            f"pieces of {PREFILL_CHUNK}, oldest first, one group": (PREFILL_CHUNK, 0, 1),
            "one pass, one group": (tokens, 0, 1),
        }
        for round_ in range(1, args.rounds + 1):
            for prefill, (chunk, long_prompt, groups) in ways.items():
                engine = Engine(
                    loaded.model,
                    loaded.tokenizer,
                    model_id=EMBEDDED_MODEL_ID,
                    prefill_chunk=chunk,
                    long_prompt_tokens=long_prompt,
                    row_groups=groups,
                )
                got = run(engine, prompt)
                engine.close()
                rows.append(
                    f"| {tokens} | {prefill} | {round_} | {got['longest_gap_s'] * 1000:.0f} "
                    f"| {got['median_gap_s'] * 1000:.0f} "
                    f"| {got['median_gap_after_s'] * 1000:.0f} | {got['first_token_s']:.1f} "
                    f"| {got['question_first_token_s']:.1f} |"
                )
                print(rows[-1], flush=True)
    record_section(
        "A long prompt on CPU",
        [
            f"{provenance()}. {STREAMS} greedy streams decode; a prompt of the given length "
            f"arrives after their first {STARTED_AFTER} pieces and asks for 16 tokens, and "
            f"{QUESTION_AFTER_S:g} s later a short question asks for 16 more. Gaps "
            "between the streams' pieces of text while it goes in (submitted to its first "
            "token) and after it joined their batch (to its last).\n",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
