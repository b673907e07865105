"""The replicas' engine on a GPU, without Ray: load time, first token, tokens/s.

    python -m bench.gpu_engine                  (--help for the knobs)

GPU machines often have no Ray and cannot download weights, so this writes a
checkpoint of the embedded model's shape (SmolLM2-135M: hidden 576, MLP 1536,
30 layers, 9 query and 3 key/value heads, vocabulary 49,152, tied embeddings)
with random weights, and a word-level tokenizer over the same vocabulary, to a
temporary folder. The engine then loads it exactly as a replica loads the
embedded model (``Engine.load``: the kit's own Llama and tokenizer, half
precision on the GPU), and the walkthrough's loop loads it with transformers.
Random weights decode at the speed real ones do; the text is nonsense, and a
row that happens to draw the end-of-sequence token stops early, so tokens/s
counts the tokens produced.

Measured in one run:
- readiness, in a fresh process as a replica starts: seconds from the
  interpreter's start until the engine has loaded and run its warm-up pass,
  with ``Engine.load``'s own breakdown;
- the first streamed token of one request on an idle engine;
- output tokens/s with 1, 8, 32 and 64 sequences submitted together, the
  milliseconds each batched step took, and the model's forward pass alone at
  the largest batch (the rest of a step is the batcher's own work);
- against the walkthrough's loop: one transformers ``generate`` call per
  request, in turn.

It also runs on CPU (``--device cpu`` with smaller ``--batches``) to check the
script.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from helpers.engine.engine import Engine, GenerationRequest, Sampling  # noqa: E402

IMPORTED = time.perf_counter()

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
EOS = SHAPE["vocab_size"] - 1
PROMPT_WORDS = 32
LONG_PROMPT_WORDS = 240


def random_state(shape: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights of the checkpoint's names and shapes, drawn as transformers
    initialises a Llama (normal, std 0.02; norms at one)."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (shape["vocab_size"], hidden)}
    for i in range(shape["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (hidden, hidden),
            layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden),
            layer + "self_attn.o_proj.weight": (hidden, hidden),
            layer + "mlp.gate_proj.weight": (inner, hidden),
            layer + "mlp.up_proj.weight": (inner, hidden),
            layer + "mlp.down_proj.weight": (hidden, inner),
        }
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    norms = [
        f"model.layers.{i}.{n}"
        for i in range(shape["num_hidden_layers"])
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
    ]
    state |= {name: torch.ones(hidden) for name in [*norms, "model.norm.weight"]}
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def write_checkpoint(directory: Path, layers: int) -> None:
    """A Llama checkpoint and word-level tokenizer, as the converted embedded
    model is laid out: what both ``Engine.load`` and transformers read."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    shape = {**SHAPE, "num_hidden_layers": layers}
    save_file(random_state(shape, torch.float16), str(directory / "model.safetensors"))
    config = {
        **shape,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "torch_dtype": "float16",
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    # One word per token id (w0 ... w49151): no files to fetch.
    tokenizer = Tokenizer(
        models.WordLevel({f"w{i}": i for i in range(SHAPE["vocab_size"])}, unk_token="w1")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": f"w{EOS}",
        "pad_token": f"w{EOS}",
        "padding_side": "left",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def load_engine(
    directory: Path, device: str, max_batch_size: int, slots: bool | None = None
) -> Engine:
    return Engine.load(
        str(directory),
        directory,
        want_gpu=device == "cuda",
        max_batch_size=max_batch_size,
        slots=slots,
    )


def report_readiness(directory: Path, device: str) -> None:
    """Run in a fresh process (``--ready-from``): load, warm up, print JSON."""
    engine = load_engine(directory, device, max_batch_size=64)
    synchronize(device)
    times = engine.load_times
    assert times is not None
    print(
        json.dumps(
            {
                "ready_s": time.perf_counter() - STARTED,
                "python_and_torch_s": IMPORTED - STARTED,
                "imports_s": times.imports_s,
                "tokenizer_s": times.tokenizer_s,
                "weights_s": times.weights_s,
                "warm_up_s": times.warm_up_s,
            }
        )
    )


def readiness(directory: Path, device: str) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "bench.gpu_engine",
        "--device",
        device,
        "--ready-from",
        str(directory),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def prompts(count: int, seed: int = 0, words: int = PROMPT_WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randint(2, EOS - 1)}" for _ in range(words)) for _ in range(count)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_run(engine: Engine, batch: int, max_tokens: int) -> tuple[float, float]:
    """``batch`` greedy requests submitted at once: tokens/s and ms per step."""
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    steps_before = engine.stats.forward_passes
    started = time.perf_counter()
    futures = [engine.submit(GenerationRequest(p, sampling)) for p in prompts(batch)]
    tokens = sum(future.result().completion_tokens for future in futures)
    seconds = time.perf_counter() - started
    return tokens / seconds, seconds * 1000 / (engine.stats.forward_passes - steps_before)


class HealthChecks:
    """``Engine.probe`` in a loop on a thread of its own, as Serve's health
    check calls it beside the decode loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.passed, self.failures = engine, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.engine.probe()
                self.passed += 1
            except Exception as err:  # reported, not raised: the decoding goes on
                self.failures.append(repr(err))

    def __enter__(self) -> HealthChecks:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> str:
        if not self.failures:
            return f"{self.passed} passed"
        return f"{self.passed} passed, {len(self.failures)} failed: {self.failures[0]}"


def same_text(
    one: Engine, other: Engine, count: int = 8, tokens: int = 16, words: int = PROMPT_WORDS
) -> int:
    """How many of ``count`` prompts decode to the same greedy text in both
    engines (random weights give flat logits, so a rounding difference can
    flip a near-tie now and then; a broken cache would flip nearly all)."""
    requests = [
        GenerationRequest(p, Sampling(tokens, temperature=0.0, top_p=1.0))
        for p in prompts(count, seed=2, words=words)
    ]
    pairs = zip(one.generate(requests), other.generate(requests), strict=True)
    return sum(a.text == b.text for a, b in pairs)


def forward_ms(engine: Engine, batch: int, past: int, steps: int = 20) -> float:
    """The model alone: one-token decode passes over ``batch`` rows with a
    ``past``-token cache, as the batcher calls it, minus the batcher."""
    model, device = engine.model, engine.device
    cache = model.new_cache()
    tokens = torch.randint(2, EOS, (batch, past), device=device)
    mask = torch.ones(batch, past, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(input_ids=tokens, attention_mask=mask, cache=cache)
        step = tokens[:, -1:]
        synchronize(engine.device.type)
        started = time.perf_counter()
        for i in range(steps):
            mask = torch.ones(batch, past + i + 1, dtype=torch.long, device=device)
            positions = torch.full((batch, 1), past + i, device=device)
            model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache)
        synchronize(engine.device.type)
    return (time.perf_counter() - started) * 1000 / steps


def loop_tokens_per_s(directory: Path, device: str, requests: int, max_tokens: int) -> float:
    """The walkthrough's way: transformers' model and tokenizer, one
    ``generate`` call per request, in turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts(requests):
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=EOS
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
        default=4,
        help="requests the walkthrough loop runs, one after another (it is slow)",
    )
    parser.add_argument(
        "--check-prompts",
        type=int,
        default=8,
        help="prompts the slots-against-padded text check decodes (half as many long ones)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=SHAPE["num_hidden_layers"],
        help="decoder layers (the embedded model's 30 by default; fewer for a quick run)",
    )
    parser.add_argument("--ready-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ready_from:
        report_readiness(args.ready_from, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="random-smollm2-") as folder:
        directory = Path(folder)
        write_checkpoint(directory, args.layers)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(f"device: {name}, torch {torch.__version__}, {sys.executable}")
        for _ in range(2):
            ready = readiness(directory, args.device)
            print(
                f"ready {ready['ready_s']:.2f} s after a fresh process started: Python and "
                f"torch {ready['python_and_torch_s']:.2f} s, engine imports "
                f"{ready['imports_s']:.2f} s, tokenizer {ready['tokenizer_s']:.2f} s, "
                f"weights {ready['weights_s']:.2f} s, warm-up pass {ready['warm_up_s']:.2f} s",
                flush=True,
            )
        largest = max(args.batches)
        slots = load_engine(directory, args.device, largest, slots=True)
        padded = Engine(
            slots.model, slots.tokenizer, model_id="padded", max_batch_size=largest, slots=False
        )
        checked, long_checked = args.check_prompts, max(1, args.check_prompts // 2)
        agree = same_text(slots, padded, count=checked)
        # Prompts just short of the slot cache's first capacity: it grows, and
        # its graphs are captured again, while these decode.
        grown = same_text(slots, padded, count=long_checked, tokens=32, words=LONG_PROMPT_WORDS)
        started = time.perf_counter()
        with HealthChecks(slots) as checks:  # as Serve's, while graphs are captured
            for batch in args.batches:  # the first pass of each shape captures its graphs
                engine_run(slots, batch, args.max_tokens)
        first_passes = time.perf_counter() - started
        first = first_token_s(slots)
        rows = [(batch, *engine_run(slots, batch, args.max_tokens)) for batch in args.batches]
        engine_run(padded, largest, 8)
        padded_row = engine_run(padded, largest, args.max_tokens)
        alone = forward_ms(slots, largest, PROMPT_WORDS + args.max_tokens // 2)
        loop = loop_tokens_per_s(directory, args.device, args.loop_requests, args.max_tokens)
    graphs = "CUDA graphs" if args.device == "cuda" else "eager"
    print(f"same greedy text from slots and the padded cache: {agree} of {checked} prompts")
    print(
        f"the same past the slots' first capacity ({LONG_PROMPT_WORDS}-word prompts, "
        f"32 tokens each): {grown} of {long_checked} prompts"
    )
    print(f"first pass at each batch size ({graphs}, captured then): {first_passes:.2f} s")
    print(f"health checks during that pass, on another thread: {checks.summary()}")
    print(f"first token, one request on an idle engine: {first * 1000:.1f} ms")
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"GPU memory at its peak, caches and graphs included: {peak:.2f} GiB")
    print(f"walkthrough loop ({args.loop_requests} requests in turn): {loop:.0f} tok/s")
    print(f"model forward alone, eager, {largest} rows: {alone:.2f} ms per step")
    print(
        f"padded cache, eager (the CPU layout), {largest} sequences: "
        f"{padded_row[0]:.0f} tok/s, {padded_row[1]:.2f} ms per step"
    )
    print(f"| sequences | engine tok/s (slots, {graphs}) | ms per step | versus the loop |")
    print("|---|---|---|---|")
    for batch, tok_s, step_ms in rows:
        print(f"| {batch} | {tok_s:.0f} | {step_ms:.2f} | {tok_s / loop:.1f}x |")


if __name__ == "__main__":
    main()
