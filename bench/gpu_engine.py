"""The replicas' engine on a GPU, without Ray: load time, first token, tokens/s.

    python -m bench.gpu_engine                  (--help for the knobs)

GPU machines often have no Ray and cannot download weights, so this builds a
model of the embedded model's shape (SmolLM2-135M: hidden 576, MLP 1536, 30
layers, 9 query and 3 key/value heads, vocabulary 49,152, tied embeddings)
with random weights, in half precision on the device (as transformers'
model for the walkthrough's loop, and as the kit's own ``helpers.llama`` with
the same weights for the engine), and a word-level tokenizer over the same
vocabulary. Random weights decode at the speed real
ones do; the text is nonsense, and a row that happens to draw the
end-of-sequence token stops early, so tokens/s counts the tokens produced.

Measured in one run: how long the process took to be ready (torch imported,
model built, one warm-up pass), the first streamed token of one request, and
output tokens/s with 1, 8, 32 and 64 sequences submitted together, against the
walkthrough's loop, one ``model.generate`` call per request in turn. It also
runs on CPU (``--device cpu`` with smaller ``--batches``) to check the script.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from helpers.engine import Engine, GenerationRequest, Sampling  # noqa: E402
from helpers.llama import Llama, LlamaConfig, build_llama  # noqa: E402

SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
PROMPT_WORDS = 32


def random_model(device: str, dtype: torch.dtype):
    """A SmolLM2-135M-shaped Llama with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    last = SHAPE["vocab_size"] - 1
    config = LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=last, pad_token_id=last)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def kit_model(reference: torch.nn.Module) -> Llama:
    """The kit's own Llama, the one replicas run, sharing ``reference``'s weights."""
    config = LlamaConfig(
        **{key: SHAPE[key] for key in LlamaConfig.__dataclass_fields__ if key in SHAPE},
        head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
        attention_bias=False,
        mlp_bias=False,
    )
    return build_llama(config, reference.state_dict(), eos_token_id=SHAPE["vocab_size"] - 1)


def word_tokenizer():
    """One word per token id (``w0`` ... ``w49151``): no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(SHAPE["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    last = f"w{SHAPE['vocab_size'] - 1}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=last, pad_token=last, padding_side="left"
    )


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    top = SHAPE["vocab_size"] - 2
    return [" ".join(f"w{rng.randint(2, top)}" for _ in range(PROMPT_WORDS)) for _ in range(count)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Throughput:
    sequences: int
    engine_tok_s: float
    loop_tok_s: float


def engine_tokens_per_s(engine: Engine, batch: int, max_tokens: int) -> float:
    """``batch`` greedy requests submitted at once, decoded together."""
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    started = time.perf_counter()
    futures = [engine.submit(GenerationRequest(p, sampling)) for p in prompts(batch)]
    tokens = sum(future.result().completion_tokens for future in futures)
    return tokens / (time.perf_counter() - started)


def loop_tokens_per_s(model: torch.nn.Module, engine: Engine, batch: int, max_tokens: int) -> float:
    """The walkthrough's way: one transformers ``generate`` call per request, in turn."""
    tokenizer = engine.tokenizer
    tokens, started = 0, time.perf_counter()
    for prompt in prompts(batch):
        inputs = tokenizer(prompt, return_tensors="pt").to(engine.device)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens += output.shape[1] - inputs["input_ids"].shape[1]
    return tokens / (time.perf_counter() - started)


def first_token_s(engine: Engine) -> float:
    """One streamed request on an idle engine: seconds to its first text."""
    arrived = threading.Event()
    sampling = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)
    started = time.perf_counter()
    future = engine.submit(
        GenerationRequest(prompts(1, seed=1)[0], sampling), lambda _: arrived.set()
    )
    arrived.wait(timeout=60)
    seconds = time.perf_counter() - started
    future.result()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--loop-requests",
        type=int,
        default=8,
        help="requests the walkthrough loop runs per batch size (it is slow)",
    )
    args = parser.parse_args()
    imported = time.perf_counter()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    reference = random_model(args.device, dtype)
    engine = Engine(
        kit_model(reference),
        word_tokenizer(),
        model_id="random SmolLM2-135M shape",
        max_batch_size=max(args.batches),
    )
    engine.probe()  # the warm-up pass a replica runs before it is ready
    synchronize(args.device)
    ready = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, {dtype}, torch {torch.__version__}")
    print(
        f"ready {ready - STARTED:.2f} s after the script started: torch and the kit "
        f"imported in {imported - STARTED:.2f} s, model built and warmed up in "
        f"{ready - imported:.2f} s"
    )
    engine_tokens_per_s(engine, max(args.batches), 8)  # warm the batched paths too
    print(f"first token, one request on an idle engine: {first_token_s(engine) * 1000:.1f} ms")
    print("| sequences | engine tok/s | walkthrough loop tok/s | ratio |")
    print("|---|---|---|---|")
    for batch in args.batches:
        ours = engine_tokens_per_s(engine, batch, args.max_tokens)
        theirs = loop_tokens_per_s(
            reference, engine, min(batch, args.loop_requests), args.max_tokens
        )
        print(f"| {batch} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
