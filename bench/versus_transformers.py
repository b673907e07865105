"""The app as ``make serve`` runs it against ``transformers serve --continuous-batching``.

    python -m bench.versus_transformers          (--help for the knobs)

Both serve the same converted embedded model on loopback, one at a time on
the machine, and get the same closed-loop load through ``POST /v1/completions``:
the prompts of ``bench/throughput.py``, greedy, ``max_tokens`` new tokens, no
stop sequence. Output tokens are each server's own ``usage.completion_tokens``.
Each server is warmed up first, the app until its autoscaler has brought the
model up to ``MAX_REPLICAS``, so neither cold start is counted. Prints a table, the
ratio, and the failed requests of each, and appends the table to
``bench/RESULTS.md`` with the machine, versions and date.

The servers take turns, app then transformers, then transformers then app
(``--rounds``, 2 by default): a shared machine's speed drifts over minutes
(``bench/README.md``), which in one turn each would land in the ratio; in this order a
steady drift cancels out. The ratio is of the mean tokens/s of each.

Another model: ``--model DIR`` serves a safetensors directory instead (the
app as its ``MODEL_ID``), and ``--cpu-weights`` sets the app's
``CPU_WEIGHTS``. ``--random-qwen2-0.5b`` builds, once, a checkpoint shaped
like Qwen2.5-0.5B-Instruct (896 hidden, 24 layers, 14 query and 2 key-value
heads, 4864 intermediate, 151,936 tokens, tied, q/k/v bias, RoPE theta 1e6)
with random weights and a Qwen2 tokenizer made here
(:func:`random_qwen2`), and serves it: the size of model people serve on
CPUs, with nothing downloaded.

    python -m bench.versus_transformers --random-qwen2-0.5b --cpu-weights q8_0 --target 1.5

A random model has no reason to end its text, and both servers stop at the
end-of-sequence ids of its generation config; so its special tokens'
embedding rows (the output layer's too: they are tied) are zero, their logit
is exactly 0 while the largest of 151,933 others is above 0, and greedy
decoding never picks them: every request runs its full ``max_tokens`` on
both servers, whatever their arithmetic. Its weights are saved in float32,
so transformers serve computes in float32 as the app's kernels do
(bfloat16 was slower on this machine's AVX2 CPU, ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.results_file import provenance, record_section
from bench.servers import (
    HEADER,
    Outcome,
    add_load_options,
    mean_tokens_per_s,
    measure,
    servers,
    taking_turns,
)
from helpers.config import ServeConfig

QWEN2_5_0_5B: dict[str, Any] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "max_window_layers": 21,
}
"""Qwen2.5-0.5B-Instruct's ``config.json``, as far as the shape goes."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen's, at its ids: 293 below the vocabulary's end (151643 to 151645)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_options(parser)
    parser.add_argument(
        "--rounds", type=int, default=2, help="turns of each server, in the order ABBA..."
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="a model directory in place of the embedded")
    model.add_argument(
        "--random-qwen2-0.5b",
        dest="random_qwen2",
        action="store_true",
        help="a Qwen2.5-0.5B-shaped checkpoint of random weights, built once in MODEL_CACHE_DIR",
    )
    parser.add_argument(
        "--cpu-weights", choices=["auto", "float32", "q8_0"], help="the app's CPU_WEIGHTS"
    )
    parser.add_argument(
        "--target", type=float, help="the ratio the app should reach: say met or missed"
    )
    args = parser.parse_args()
    config = ServeConfig.from_env()
    if args.random_qwen2:
        args.model = random_qwen2(config.model_cache_dir / "bench" / "qwen2.5-0.5b-random")
    app_env = {"CPU_WEIGHTS": args.cpu_weights} if args.cpu_weights else {}
    both = servers(config, args.model, app_env)
    if args.cpu_weights:
        app = both["app"]
        both["app"] = dataclasses.replace(app, name=f"{app.name}, {args.cpu_weights}")
    print(HEADER, flush=True)
    ours: list[Outcome] = []
    theirs: list[Outcome] = []
    for key in taking_turns("app", "transformers", args.rounds):
        (ours if key == "app" else theirs).extend(measure(both[key], args))
    ratio = mean_tokens_per_s(ours) / mean_tokens_per_s(theirs)
    summary = (
        f"app / transformers serve --continuous-batching = {ratio:.2f}x output tokens/s "
        f"(means of {len(ours)} measurements each, servers taking turns)"
    )
    if args.target is not None:
        met = "met" if ratio >= args.target else "missed"
        failed = sum(o.failed for o in [*ours, *theirs])
        summary += f"; target {args.target:g}x: {met}, {failed} failed"
    print(summary)
    write_results([*ours, *theirs], summary, args)


def write_results(outcomes: list[Outcome], summary: str, args: argparse.Namespace) -> None:
    title = "Head to head"
    if args.model is not None:
        title += f": {args.model.name}"
    if args.cpu_weights:
        title += f", CPU_WEIGHTS={args.cpu_weights}"
    record_section(
        title,
        [
            f"{provenance()}. {args.requests} requests at concurrency {args.concurrency}, "
            f"{args.max_tokens}-token greedy completions through `/v1/completions`, one "
            "server at a time.\n",
            HEADER,
            *(o.row() for o in outcomes),
            f"\n{summary}.",
        ],
    )


def random_qwen2(directory: Path, shape: Mapping[str, Any] = QWEN2_5_0_5B, seed: int = 0) -> Path:
    """A Qwen2 checkpoint of ``shape`` with random weights in ``directory``,
    built unless a build of the same shape and seed is there already.

    The tokenizer is a Qwen2Tokenizer with Qwen's split pattern, its merges
    trained on ``tests/family_checkpoints.py``'s text (that module's
    builder), and as many entries as the model has rows, so that every id
    the random model picks decodes: the trained tokens, then made-up
    lower-case words (" ab", " ac"...), and Qwen's three special tokens at
    their ids. The special tokens' embedding rows are zero (see the module's
    docstring); the q/k/v biases are random like the weights. The
    generation config holds only the special ids: Qwen's own asks for
    sampling with a repetition penalty, which the requests here (greedy)
    would have transformers serve apply and the app not."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    stamp = {"shape": dict(shape), "seed": seed, "version": 2}
    marker = directory / "build.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    qwen2_tokenizer(shape["vocab_size"]).save_pretrained(directory)
    ids = [shape["vocab_size"] - 293 + i for i in range(len(SPECIAL_TOKENS))]
    endoftext, _, im_end = ids
    config = Qwen2Config(**shape, bos_token_id=endoftext, eos_token_id=im_end, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = 0
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts them at zero; Qwen's are not
                parameter.normal_(0.0, config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(directory)
    marker.write_text(json.dumps(stamp))
    return directory


def qwen2_tokenizer(vocab_size: int) -> Any:
    """Qwen2Tokenizer with ``vocab_size`` entries (see :func:`random_qwen2`)."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from tests.family_checkpoints import QWEN2_TEMPLATE, _byte_level_vocab, qwen_repo_tokenizer

    trained, merges = _byte_level_vocab(PRETOKENIZE_REGEX, False, 400)
    special_ids = {t: vocab_size - 293 + i for i, t in enumerate(SPECIAL_TOKENS)}
    words = (
        "\u0120" + "".join(letters)  # "Ġ": a space, to the byte-level decoder
        for length in itertools.count(2)
        for letters in itertools.product(string.ascii_lowercase, repeat=length)
    )
    tokens = iter(itertools.chain(sorted(trained, key=trained.get), words))
    free_ids = (i for i in range(vocab_size) if i not in special_ids.values())
    vocab = dict(special_ids)
    for index in free_ids:
        token = next(tokens)
        while token in vocab:
            token = next(tokens)
        vocab[token] = index
    extra = [AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]]
    return qwen_repo_tokenizer(vocab, merges, extra, QWEN2_TEMPLATE)


if __name__ == "__main__":
    main()
