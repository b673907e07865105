"""What scoring a long prompt (``echo`` with ``logprobs``) costs the streams
decoding beside it: the longest gap between one stream's pieces of text while a
prompt of some 2,900 tokens is scored, scored a chunk of ``SCORING_CHUNK``
tokens per step boundary against the whole prompt in one piece, as it was
before the chunks were pieces of their own.

    python -m bench.echo_fairness        (--help for the knobs)

The replicas' Engine alone, on the embedded model: no Ray, no HTTP. The two
ways take turns for ``--rounds`` rounds. Prints each run, and records them in
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from bench.results_file import provenance, record_section
from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import engine as engine_module
from helpers.engine.engine import Engine, GenerationRequest, Sampling

PROMPT = " ".join(f"{i} green bottles" for i in range(500))
STREAM_TOKENS = 160
SCORED_AFTER = 20
"""Pieces the stream has sent before the scoring is asked for."""


def gaps_beside_scoring(engine: Engine, chunk: int) -> tuple[float, float]:
    """The longest and the median gap between the stream's pieces, in seconds."""
    engine_module.SCORING_CHUNK = chunk
    stamps: list[float] = []
    sampling = Sampling(STREAM_TOKENS, temperature=0.0, top_p=1.0, ignore_eos=True)
    stream = engine.submit(
        GenerationRequest("Count from one to a hundred:", sampling),
        on_text=lambda _: stamps.append(time.perf_counter()),
    )
    while len(stamps) < SCORED_AFTER:
        time.sleep(0.01)
    engine.prompt_logprobs(PROMPT, 1).result(timeout=600)
    stream.result(timeout=600)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return max(gaps), statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="turns of each way")
    args = parser.parse_args()
    engine = Engine.load(EMBEDDED_MODEL_ID, ServeConfig.from_env().model_cache_dir)
    tokens = len(engine.tokenizer(PROMPT)["input_ids"])
    ways = {f"a chunk of {engine_module.SCORING_CHUNK} a piece": engine_module.SCORING_CHUNK}
    ways["the whole prompt in one piece"] = tokens
    rows = ["| scored | round | longest gap ms | median gap ms |", "|---|---|---|---|"]
    for round_ in range(1, args.rounds + 1):
        for way, chunk in ways.items():
            longest, median = gaps_beside_scoring(engine, chunk)
            rows.append(f"| {way} | {round_} | {longest * 1000:.0f} | {median * 1000:.1f} |")
            print(rows[-1], flush=True)
    record_section(
        "A long prompt scored beside a stream",
        [
            f"{provenance()}. A {tokens}-token prompt scored (`Engine.prompt_logprobs`, top 1) "
            f"while one greedy stream of {STREAM_TOKENS} tokens decodes; gaps between the "
            "stream's pieces of text.\n",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
