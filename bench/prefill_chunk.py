"""How long running streams pause while a long prompt goes in, and what its
own first token costs, by the prompt tokens a pass prefills
(``PREFILL_CHUNK_TOKENS``) and the replica's CPU threads, on CPU.

A piece's arithmetic is shared by the threads, so the pause a piece causes
grows as a replica's threads shrink; the kit's default layout is two
replicas of one CPU each. The scenario is ``bench.long_prompt``'s: streams
decode, a long prompt arrives, a short question a second later. The
configurations take turns in one process.

    python -m bench.prefill_chunk        (--help for the knobs)

The replicas' Engine alone, on the embedded model: no Ray, no HTTP. Prints
each run, and records them in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse

import torch

from bench.long_prompt import run
from bench.results_file import provenance, record_section
from bench.warm_model import prompt_of, warm_model
from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="the long prompt's")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rounds", type=int, default=2, help="turns of each configuration")
    args = parser.parse_args()
    loaded = warm_model(max(args.threads))
    prompt = prompt_of(loaded, args.tokens)
    rows = [
        "| threads | tokens a pass | round | streams' longest gap ms | median gap ms "
        "| its first token s | the question's first token s |",
        "|---|---|---|---|---|---|---|",
    ]
    for round_ in range(1, args.rounds + 1):
        for threads in args.threads:
            for chunk in args.chunks:
                torch.set_num_threads(threads)  # the engine's decode thread takes it on
                engine = Engine(
                    loaded.model, loaded.tokenizer, model_id=EMBEDDED_MODEL_ID, prefill_chunk=chunk
                )
                got = run(engine, prompt)
                engine.close()
                rows.append(
                    f"| {threads} | {chunk} | {round_} | {got['longest_gap_s'] * 1000:.0f} "
                    f"| {got['median_gap_s'] * 1000:.0f} | {got['first_token_s']:.1f} "
                    f"| {got['question_first_token_s']:.1f} |"
                )
                print(rows[-1], flush=True)
    record_section(
        "Prefill chunk by threads on CPU",
        [
            f"{provenance()}. The long-prompt scenario (`bench.long_prompt`) with a prompt of "
            f"{args.tokens} tokens: gaps between the streams' pieces of text while it goes in "
            "(submitted to its first token), its first token, and a short question's sent "
            "a second after it.\n",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
