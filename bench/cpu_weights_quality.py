"""What ``CPU_WEIGHTS=q8_0`` costs in quality, on the embedded SmolLM2.

    python -m bench.cpu_weights_quality          (--help for the knobs)

Loads the embedded model three ways, one after another, and measures each
against the fp32 weights in the same run:

- ``fp32``: ``CPU_WEIGHTS=float32``, the weights the GGUF de-quantises to;
- ``q8_0``: the same fp32 weights quantized at load to GGUF Q8_0
  (:mod:`helpers.engine.cpu_weights`), what any other checkpoint gets;
- ``gguf``: the default load, the embedded file's own 4-bit Q4_1 blocks (Q8_0
  output layer), for reference.

For each: perplexity on a fixed English text (:data:`TEXT`, in this file, so
nothing is downloaded), its relative difference from fp32 (target: q8_0
within 1%), and greedy agreement with fp32 on :data:`PROMPTS` (each as a chat
turn, ``--new-tokens`` tokens, end-of-sequence ignored so every prompt runs
its full length): the prompts whose tokens all match, and the share of tokens
produced before each prompt's first divergence. Prints a table and records it
in ``bench/RESULTS.md``. Speed is ``bench.versus_transformers``'s to measure
(``--cpu-weights q8_0``), through the app as users run it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.results_file import provenance, record_section
from helpers.config import ServeConfig
from helpers.engine.engine import Engine

TEXT = """\
The lighthouse stood at the end of a long spit of sand, and for most of the year the \
only people who walked out to it were the keeper and the boy who brought his bread. The \
keeper was an old man who had come to the coast after a life inland, and he said that he \
had taken the job because he wanted to look at something that moved without ever going \
anywhere. Every evening he climbed the iron stairs, cleaned the glass, trimmed the wick \
and waited for the dark.

The boy asked him once whether he was ever lonely. The keeper thought about it for a \
long time before he answered. He said that a lonely person is one who has nobody to \
think about, and that he had more people to think about than he could count: every ship \
that passed in the night, every captain who looked for his light and found it, every \
sailor asleep below deck who would never know his name. The boy did not understand this \
at first, but he remembered it.

In the winter the storms came in from the west. Waves broke over the spit and the sand \
shifted, so that the path the boy walked in the morning was not always the path he \
walked in the afternoon. On the worst days the keeper told him to stay at home, and the \
boy would watch the light from his window instead, counting the seconds between each \
turn of the lamp. Eight seconds, always eight. He found that counting made him calm.

Years later, when the lighthouse was replaced by an automatic beacon and the keeper had \
moved to a small house in the town, the boy, now grown, visited him on Sundays. They \
talked about the weather, about the price of fish, about the new harbour wall that the \
council had promised and never built. The old man still woke every evening at the hour \
when he used to climb the stairs. He said his body had not been told that the work was \
over.

A town is held together by small promises kept over many years. The baker opens before \
dawn, the postman walks the same streets in the rain, the teacher learns the names of \
every child in the class. None of these things is remarkable on its own, and nobody \
writes them down, but when one of them stops, people notice at once. It is only then \
that they understand how much of their ordinary day rested on someone else's patience.

When the keeper died, the town held a small service by the water. Somebody suggested \
that the beacon be switched off for a minute in his honour, but the harbour master said \
that this would not be safe, and everyone agreed that the keeper would have said the \
same. So instead they stood on the spit at dusk and watched the light turn, counting \
the seconds between each flash, as the boy had done as a child. Eight seconds, always \
eight.
"""

PROMPTS = [
    "Write a haiku about Ray Serve.",
    "Tell a long story about the number 3.",
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What are the benefits of regular exercise?",
    "Describe how a bicycle works.",
    "List five animals that live in the ocean.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a recipe for pancakes.",
    "Why do leaves change colour in autumn?",
    "Explain what a computer program is.",
]

VARIANTS = {"fp32": "float32", "q8_0": "q8_0", "gguf": "auto"}
"""Each variant's ``CPU_WEIGHTS``, fp32 first: the others are compared with it."""


@dataclass(frozen=True)
class Quality:
    name: str
    weights: str
    perplexity: float
    tokens: list[list[int]]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token after the first."""
    tokens = torch.tensor([ids])
    logits = model(tokens).logits[0, :-1]
    return torch.exp(F.cross_entropy(logits.float(), tokens[0, 1:])).item()


@torch.inference_mode()
def greedy_ids(
    model: torch.nn.Module, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """``new_tokens`` greedy tokens for each prompt, all decoded as one
    left-padded batch through the model's KV cache, never stopping at an
    end-of-sequence token: every prompt yields the same number of tokens, so
    agreement is counted over the same positions."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache()
    produced = []
    for _ in range(new_tokens):
        logits = model(
            ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        ).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        produced.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(produced, dim=1).tolist()


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[int, float]:
    """Prompts whose tokens all match ``reference``, and the share of all
    tokens produced before each prompt's first difference."""
    agreed = []
    for ours, theirs in zip(tokens, reference, strict=True):
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours)
        )
        agreed.append(first)
    exact = sum(a == len(t) for a, t in zip(agreed, tokens, strict=True))
    return exact, sum(agreed) / sum(len(t) for t in tokens)


def measure(name: str, cpu_weights: str, args: argparse.Namespace) -> Quality:
    config = ServeConfig.from_env({})
    engine = Engine.load(
        config.model_id,
        config.model_cache_dir,
        cpu_threads=args.threads,
        prepack=False,
        cpu_weights=cpu_weights,
    )
    text_ids = engine.tokenizer(TEXT)["input_ids"]
    prompts = [
        engine.tokenizer(engine.format_prompt(p, "auto"))["input_ids"]
        for p in PROMPTS[: args.prompts]
    ]
    ppl = perplexity(engine.model, text_ids)
    tokens = greedy_ids(engine.model, prompts, args.new_tokens)
    print(f"{name}: {engine.info.weights}, {len(text_ids)} text tokens", flush=True)
    return Quality(name, engine.info.weights, ppl, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    results = [measure(name, weights, args) for name, weights in VARIANTS.items()]
    fp32 = results[0]
    header = (
        "| weights | perplexity | vs fp32 | prompts exactly fp32's | tokens before "
        "divergence |\n|---|---|---|---|---|"
    )
    rows = []
    for result in results:
        exact, share = agreement(result.tokens, fp32.tokens)
        change = result.perplexity / fp32.perplexity - 1
        rows.append(
            f"| {result.name} | {result.perplexity:.3f} | {change:+.2%} | "
            f"{exact} / {len(result.tokens)} | {share:.1%} |"
        )
    q8 = next(r for r in results if r.name == "q8_0")
    change = q8.perplexity / fp32.perplexity - 1
    verdict = "met" if abs(change) <= 0.01 else "missed"
    summary = f"q8_0 perplexity within 1% of fp32: {verdict} ({change:+.2%})"
    print(header, *rows, summary, sep="\n")
    record_section(
        "CPU weights quality",
        [
            f"{provenance()}. The embedded SmolLM2-135M-Instruct; perplexity over the "
            f"bench's fixed text; greedy agreement with fp32 on {len(fp32.tokens)} chat "
            f"prompts x {args.new_tokens} tokens (end-of-sequence ignored), decoded as one "
            "batch.\n",
            header,
            *rows,
            f"\n{summary}. q8_0 ran on {q8.weights}. The fp32 weights are the embedded "
            "GGUF's blocks de-quantised, so `gguf` computes the same weights (its kernels "
            "only add in another order); `q8_0` rounds them again onto 8-bit blocks, and "
            "with int8 activations each row too, per block of 32 inputs, as llama.cpp's "
            "Q8_0 dot product does. Where two tokens were nearly tied greedy decoding can "
            "take the other, and the text parts from there.",
        ],
    )


if __name__ == "__main__":
    main()
