"""What keeping ended sequences' keys and values (``PREFIX_CACHE_MB``) saves a
chat, and requests that share a system prompt, on CPU.

Two scenarios, each run by an engine that keeps them and one that keeps
nothing, taking turns in one process on the embedded model (no Ray, no
HTTP):

- a chat: a long system prompt, then turns of a short question each, every
  turn sending the whole conversation again, as chat clients do; each turn's
  time to first token;
- a burst: questions that share the system prompt, submitted together after
  one has run; their median and longest time to first token;
- what keeping costs traffic that never reuses it: ``bench.mixed_lengths``'s
  load (distinct prompts of mixed lengths, one every 0.3 s), output tok/s.

    python -m bench.prefix_cache        (--help for the knobs)

Greedy, so both engines must give the same texts (checked). The engines
take turns going first. Prints each run, and records them in
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import mixed_lengths
from bench.results_file import provenance, record_section
from bench.warm_model import SENTENCE, prompt_of, warm_model
from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.engine import Engine, GenerationRequest, Sampling

QUESTIONS = [
    "What is a replica?",
    "How does a replica start?",
    "What does scale to zero mean?",
    "Why batch requests together?",
    "What is a cold start?",
    "How do I see the replicas?",
    "What does the ingress do?",
    "Where do the weights come from?",
]


def greedy(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(tokens, temperature=0.0, top_p=1.0))


def first_token_s(engine: Engine, prompts: list[str], tokens: int) -> tuple[list[float], list[str]]:
    """Each prompt's seconds to its first token, and its text, submitted together."""
    with engine.together():
        futures = [engine.submit(greedy(prompt, tokens)) for prompt in prompts]
    done = [future.result(timeout=600) for future in futures]
    return [c.timing.first_token_s for c in done if c.timing], [c.text for c in done]


def chat(engine: Engine, system: str, turns: int, tokens: int) -> tuple[list[float], list[str]]:
    """A conversation of ``turns`` questions: each turn's first token and reply."""
    messages = [{"role": "system", "content": system}]
    seconds, replies = [], []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        (took,), (reply,) = first_token_s(engine, [engine.render_chat(messages)], tokens)
        messages.append({"role": "assistant", "content": reply})
        seconds.append(took)
        replies.append(reply)
    return seconds, replies


def burst(engine: Engine, system: str, tokens: int) -> tuple[list[float], list[str]]:
    """One question, then the others at once, all after the same system prompt."""
    prompts = [
        engine.render_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    first_token_s(engine, prompts[:1], tokens)
    return first_token_s(engine, prompts[1:], tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system-sentences", type=int, default=40, help="the system prompt's")
    parser.add_argument("--turns", type=int, default=6, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--tokens", type=int, default=32, help="each reply's most")
    parser.add_argument("--threads", type=int, default=1, help="a default replica has one CPU")
    parser.add_argument("--megabytes", type=int, default=256, help="what the keeping engine keeps")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each engine")
    args = parser.parse_args()
    loaded = warm_model(args.threads)
    torch.set_num_threads(args.threads)  # the engines' decode threads take it on
    system = SENTENCE * args.system_sentences
    lengths = mixed_lengths.LENGTHS * 3
    distinct = [prompt_of(loaded, n, f"Request {i}. ") for i, n in enumerate(lengths)]
    ways = {"kept": args.megabytes << 20, "none": 0}
    header = " | ".join(f"turn {n}" for n in range(1, args.turns + 1))
    rows = [
        f"| prefix cache | round | chat: first token s, {header} | burst: median s | longest s "
        "| distinct prompts: output tok/s |",
        "|---|---|" + "---|" * args.turns + "---|---|---|",
    ]
    texts: dict[str, list[str]] = {}
    for round_ in range(1, args.rounds + 1):
        order = list(ways.items())  # each goes first in turn: a later run finds a warmer process
        for way, budget in order if round_ % 2 else order[::-1]:
            engine = Engine(
                loaded.model,
                loaded.tokenizer,
                model_id=EMBEDDED_MODEL_ID,
                prefix_cache_bytes=budget,
            )
            turns, replies = chat(engine, system, args.turns, args.tokens)
            together, answers = burst(engine, system, args.tokens)
            unshared = mixed_lengths.run(engine, distinct, 0.3, args.tokens)
            engine.close()
            got = replies + answers + unshared["texts"]
            texts.setdefault(way, got)
            assert texts[way] == got, f"{way}: greedy texts changed between rounds"
            rows.append(
                f"| {way} | {round_} | "
                + " | ".join(f"{s:.2f}" for s in turns)
                + f" | {statistics.median(together):.2f} | {max(together):.2f} "
                + f"| {unshared['tok_s']:.1f} |"
            )
            print(rows[-1], flush=True)
    same = texts["kept"] == texts["none"]
    print(f"same texts with and without the prefix cache: {same}")
    system_tokens = loaded.count_tokens(system)
    shown = ", ".join(map(str, mixed_lengths.LENGTHS))
    record_section(
        "Prefix cache on CPU",
        [
            f"{provenance()}. A system prompt of {system_tokens} tokens; a chat of "
            f"{args.turns} turns (each resends the conversation) and a burst of "
            f"{len(QUESTIONS) - 1} questions after it, submitted together once one has run; "
            f"then {len(distinct)} distinct prompts of {shown} tokens, one every 0.3 s, "
            "which share nothing; "
            f"greedy replies of at most {args.tokens} tokens; {args.threads} thread(s); "
            f"same texts with and without: {same}.\n",
            *rows,
        ],
    )
    assert same, "the prefix cache changed a greedy text"


if __name__ == "__main__":
    main()
