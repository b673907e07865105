"""The replicas' engine on a GPU, without Ray: load time, first token, tokens/s.

    python -m bench.gpu_engine                  (--help for the knobs)
    python -m bench.gpu_engine --shape qwen3-0.6b

GPU machines often have no Ray and cannot download weights, so this writes a
checkpoint with random weights to a temporary folder: of the embedded model's
shape (SmolLM2-135M) by default, or with ``--shape`` of Qwen2.5-0.5B,
Qwen3-0.6B or Llama-3.2-1B, each with its family's own layers (q/k/v biases,
q/k norms, llama3 RoPE scaling), and a tokenizer of one word per id. The
engine then loads it exactly as a replica loads a model (``Engine.load``: the
kit's own Llama and tokenizer, half precision on the GPU, its paged KV cache
allocated at load within ``GPU_MEMORY_FRACTION``), and the walkthrough's loop
loads it with transformers. Prompts are random token ids, given as ids: the
tokenizer only turns output into text. Random weights decode at the speed
real ones do; the text is nonsense, and a row that happens to draw the
end-of-sequence token stops early, so tokens/s counts the tokens produced.

Measured in one run:
- readiness, in a fresh process as a replica starts: seconds from the
  interpreter's start until the engine has loaded and run its warm-up pass,
  with ``Engine.load``'s own breakdown;
- the first streamed token of one request on an idle engine;
- output tokens/s with 1, 8, 64 and 256 sequences submitted together, the
  milliseconds each batched step took, the largest batch again with every
  request streamed (its text decoded token by token, as a server streams
  it), and the model's forward pass alone at the largest batch (the rest of
  a step is the batcher's own work);
- nano-vllm's workload (:data:`NANO_VLLM`), on a GPU, twice: first with the
  decode-step shapes it needs captured as it meets them, then again with
  them captured, as a server that has run a while serves it;
- the GPU's peak memory;
- one prompt of 32,768 tokens (or the context less one, where shorter), on
  a GPU: its prefill passes (a piece of the prompt each), its first token,
  and the memory its passes took beyond the weights and pages;
- a burst of questions after one long system prompt, on a GPU, with and
  without the paged layout's kept pages (decision 0042): each question's
  first token, the prompt tokens found kept, and whether the same prompts
  get the same greedy token both ways;
- one layer's decode attention with the pages read in place and gathered;
- a decode step with torch's operations between each layer's matrix products
  and with the fused kernels of :mod:`helpers.engine.fused_layer_ops` (on a
  GPU), and the kernels each launches;
- against the walkthrough's loop: one transformers ``generate`` call per
  request, in turn.

It also runs on CPU (``--device cpu`` with smaller ``--batches``) to check the
script.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import as_completed  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from helpers.engine import paged_rows  # noqa: E402
from helpers.engine.engine import Engine, GenerationRequest, Sampling  # noqa: E402
from helpers.engine.kv_budget import ACTIVATION_SHARE  # noqa: E402
from helpers.engine.kv_cache import PagedCache, pages_for  # noqa: E402
from helpers.engine.layer_ops import LayerOps  # noqa: E402
from helpers.engine.paged_rows import (  # noqa: E402
    PREFILL_TOKENS,
    SMALLEST_WIDTH,
    DecodeGraph,
    DecodeStep,
    power_of_two_at_least,
)

IMPORTED = time.perf_counter()

SHAPE = {
    "model_type": "llama",
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
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": SHAPE,
    # Qwen2.5-0.5B-Instruct's config.json: q/k/v biases, theta 1e6.
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
    },
    # Qwen3-0.6B's: q/k norms, head_dim 128 wider than hidden / heads.
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    # Llama-3.2-1B's: llama3 RoPE scaling, theta 5e5.
    "llama3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}
"""The real models' shapes, weights aside: the embedded model's and the
families a Colab or cluster user would serve (issue 23)."""
NANO_VLLM = {"requests": 256, "shortest": 100, "longest": 1024}
"""nano-vllm's published workload: 256 requests, prompt and output lengths
uniform in 100 to 1,024 tokens, the end-of-sequence token ignored."""
PROMPT_WORDS = 32
LONG_PROMPT_WORDS = 240
GPU_SHARE = 0.9
"""``GPU_MEMORY_FRACTION`` of the engine measured: one replica on the GPU."""
CHECK_PIECE_TOKENS = 64
"""``PREFILL_TOKENS`` while the long prompts' text is checked, so each is
prefilled in pieces, as a prompt past 8,192 tokens is."""
LONG_CONTEXT_WORDS = 4 * PREFILL_TOKENS
"""The long-context prompt's length on a GPU, where the context allows."""
SHARED_PROMPT = "64x1000"
"""Questions, and the system prompt's words before each, of the burst that
shares one system prompt, on a GPU."""


EOS_OF_PROMPTS = SHAPE["vocab_size"] - 1
"""Prompts draw their words below this id, which every shape's vocabulary has."""


def checkpoint_config(shape_name: str, layers: int) -> Any:
    """transformers' config of ``shape_name`` with ``layers`` layers, the
    vocabulary's last id as the end-of-sequence token."""
    from transformers import AutoConfig

    shape = {**SHAPES[shape_name], "num_hidden_layers": layers}
    eos = shape["vocab_size"] - 1
    return AutoConfig.for_model(
        shape.pop("model_type"), **shape, bos_token_id=0, eos_token_id=eos, pad_token_id=eos
    )


def write_checkpoint(directory: Path, shape_name: str, layers: int) -> None:
    """A checkpoint of ``shape_name`` with random weights (transformers'
    own initialisation of that family, its norms and biases perturbed, in
    float16) and a tokenizer of one word per id, with the vocabulary's last
    id as the end-of-sequence token: what both ``Engine.load`` and
    transformers read.

    The tokenizer is a BPE without merges, which decodes as a word list
    would, so the kit's tokenizer loads it for every family, as it loads the
    real ones: transformers 5 rebuilds a Qwen2 checkpoint's tokenizer as
    BPE whatever its file says, and would not read a word-level one (nor
    encode text with this one, which is why prompts come as ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = checkpoint_config(shape_name, layers)
    vocab = config.vocab_size
    eos = vocab - 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Initialised, norm weights are all one and biases zero: a norm or a
        # bias applied to the wrong head or projection would go unseen.
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(directory)
    # One word per token id (w0 ... w<vocab - 1>): no files to fetch.
    # "Ġ" is byte-level BPE's space, which Qwen2's rebuilt decoder expects.
    tokenizer = Tokenizer(models.BPE({f"Ġw{i}": i for i in range(vocab)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": f"Ġw{eos}",
        "pad_token": f"Ġw{eos}",
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
        gpu_memory_fraction=GPU_SHARE,
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


def prompts(count: int, seed: int = 0, words: int = PROMPT_WORDS) -> list[tuple[int, ...]]:
    """``count`` prompts of ``words`` random token ids each."""
    rng = random.Random(seed)
    return [tuple(rng.randint(2, EOS_OF_PROMPTS - 1) for _ in range(words)) for _ in range(count)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_run(
    engine: Engine, batch: int, max_tokens: int, streamed: bool = False
) -> tuple[float, float]:
    """``batch`` greedy requests submitted at once: tokens/s and ms per step.
    ``streamed``: each request's text piece by piece, as a server streams it,
    which decodes every new token on the decode thread."""
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    steps_before = engine.stats.forward_passes
    pieces: list[str] = []
    on_text = pieces.append if streamed else None
    started = time.perf_counter()
    futures = [engine.submit(GenerationRequest(p, sampling), on_text) for p in prompts(batch)]
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
    engines, not empty (random weights give flat logits, so a rounding
    difference can flip a near-tie now and then; a broken cache would flip
    nearly all)."""
    requests = [
        GenerationRequest(p, Sampling(tokens, temperature=0.0, top_p=1.0))
        for p in prompts(count, seed=2, words=words)
    ]
    pairs = zip(one.generate(requests), other.generate(requests), strict=True)
    return sum(a.text == b.text != "" for a, b in pairs)


def forward_ms(engine: Engine, batch: int, past: int, steps: int = 20) -> float:
    """The model alone: one-token decode passes over ``batch`` rows with a
    ``past``-token cache, as the batcher calls it, minus the batcher."""
    model, device = engine.model, engine.device
    cache = model.new_cache()
    tokens = torch.randint(2, EOS_OF_PROMPTS, (batch, past), device=device)
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


def attention_ms(
    engine: Engine, rows: int, positions: int, steps: int = 20
) -> tuple[float | None, float]:
    """One layer's decode attention alone, in a paged cache of ``rows``
    sequences of ``positions`` positions each, as wide as the engine's step
    would read: milliseconds a step reading the pages in place (None where
    the kernel does not run), and gathering them for torch's attention, as
    the engine does without the kernel. The pass's own set-up (``select``,
    the mask), once a step rather than once a layer, is left out."""
    config, device = engine.model.config, engine.device
    dtype = next(engine.model.parameters()).dtype
    one_layer = dataclasses.replace(config, num_hidden_layers=1)
    # As wide as the engine's step: the smallest power of two past every row.
    width = power_of_two_at_least(positions + 1, SMALLEST_WIDTH)
    pages = rows * pages_for(positions + 1)
    cache = PagedCache(one_layer, rows, pages, width, dtype, device, engine.model.decode_kernel)
    cache.assign(list(range(rows)), [positions + 1] * rows)
    layer = cache.layers[0]
    layer.keys.normal_()
    layer.values.normal_()
    kernel = cache.decode_kernel
    shape = (rows, config.num_attention_heads, 1, config.head_dim)
    queries = torch.randn(shape, dtype=dtype, device=device)
    shape = (rows, config.num_key_value_heads, 1, config.head_dim)
    new = torch.randn(shape, dtype=dtype, device=device)
    at = torch.full((rows, 1), positions, device=device)

    def timed(decode_kernel: Any) -> float:
        cache.decode_kernel = decode_kernel
        with torch.inference_mode():
            cache.select(torch.arange(rows, device=device), at, width)
            mask = cache.mask(None, at, 1, config.sliding_window)
            for step in range(steps + 1):
                if step == 1:  # the first warms up
                    synchronize(device.type)
                    started = time.perf_counter()
                layer.attend(queries, new, new, mask, config.head_dim**-0.5)
            synchronize(device.type)
        return (time.perf_counter() - started) * 1000 / steps

    return (None if kernel is None else timed(kernel)), timed(None)


@contextlib.contextmanager
def decode_step(
    engine: Engine, batch: int, past: int, ops: LayerOps, graph: bool
) -> Iterator[tuple[DecodeStep, list[int], list[int]]]:
    """A decode step of ``batch`` rows ``past`` positions deep, with ``ops``
    for each layer's steps between its matrix products while inside, run
    once (compiled and warmed up), with its tokens and positions. A CUDA
    graph where ``graph``, as the engine replays it. A cache of its own, so
    the engine's is left as it was."""
    model = engine.model
    width = power_of_two_at_least(past + 1, SMALLEST_WIDTH)
    cache = model.new_paged_cache(batch, batch * pages_for(past + 1), width)
    cache.assign(list(range(batch)), [past + 1] * batch)
    tokens, positions = [EOS_OF_PROMPTS - 1] * batch, [past] * batch
    kept, model.ops = model.ops, ops
    try:
        with torch.inference_mode():
            step = (DecodeGraph if graph else DecodeStep)(model, cache, batch, width)
            step.run(tokens, positions)
            yield step, tokens, positions
    finally:
        model.ops = kept


def decode_step_ms(
    engine: Engine, batch: int, past: int, ops: LayerOps, steps: int = 50
) -> tuple[float, torch.Tensor]:
    """:func:`decode_step` replayed as the engine replays it (a CUDA graph on
    a GPU): milliseconds a step, and the last step's logits."""
    device = engine.device.type
    with decode_step(engine, batch, past, ops, graph=device == "cuda") as (step, *inputs):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            logits = step.run(*inputs)
        synchronize(device)
        return (time.perf_counter() - started) * 1000 / steps, logits.clone()


def gpu_kernels_per_step(engine: Engine, ops: LayerOps) -> int:
    """The kernels one eager decode step of 8 rows launches on a GPU with
    ``ops``, as torch's profiler counts them (copies and fills included).
    Run last: a profiler once attached can slow what is timed after."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with decode_step(engine, 8, 64, ops, graph=False) as (step, *_):
        torch.cuda.synchronize()
        # With the CPU's activity too: without it, kernels have gone uncounted.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
            step.forward()
            torch.cuda.synchronize()
    return sum(event.device_type == DeviceType.CUDA for event in profiled.events())


def loop_tokens_per_s(directory: Path, device: str, requests: int, max_tokens: int) -> float:
    """The walkthrough's way: transformers' model, one ``generate`` call per
    request, in turn (on token ids, as the engine is given them)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    tokens, started = 0, time.perf_counter()
    for prompt in prompts(requests):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
            )
        tokens += output.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - started)


def nano_vllm_run(
    engine: Engine, requests: int, shortest: int, longest: int
) -> tuple[int, float, int, int]:
    """nano-vllm's workload (:data:`NANO_VLLM`), all submitted at once: the
    output tokens, the seconds they took, the forward passes, and the decode
    steps' shapes first captured during it (a CUDA graph each, on a GPU):
    as sequences end, the steps shrink to shapes the runs before may not
    have needed."""
    rng = random.Random(0)
    work = [
        GenerationRequest(
            prompts(1, seed=index, words=rng.randint(shortest, longest))[0],
            Sampling(rng.randint(shortest, longest), temperature=0.0, top_p=1.0, ignore_eos=True),
        )
        for index in range(requests)
    ]
    shapes, passes = captured_shapes(engine), engine.stats.forward_passes
    started = time.perf_counter()
    futures = [engine.submit(request) for request in work]
    tokens = sum(future.result().completion_tokens for future in futures)
    seconds = time.perf_counter() - started
    return tokens, seconds, engine.stats.forward_passes - passes, captured_shapes(engine) - shapes


def captured_shapes(engine: Engine) -> int:
    """Decode-step shapes the engine holds as CUDA graphs (none where it runs eagerly)."""
    return len(engine._batcher._rows.graphs or ())


def long_prompt_run(engine: Engine, words: int) -> tuple[float, int, float]:
    """One prompt of ``words`` tokens on an idle engine, in the passes
    :func:`~helpers.engine.paged_rows.prefill_pieces` cuts it into: seconds
    to its first (and only) token, the forward passes that took, and the GiB
    they took beyond what was allocated before (on CPU, 0)."""
    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if on_gpu else 0
    request = GenerationRequest(
        prompts(1, seed=3, words=words)[0], Sampling(1, temperature=0.0, top_p=1.0)
    )
    passes, started = engine.stats.forward_passes, time.perf_counter()
    engine.generate([request])
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - before if on_gpu else 0
    return seconds, engine.stats.forward_passes - passes, peak / 2**30


def shared_prompt_run(
    engine: Engine, questions: int, system_words: int, keep: bool, seed: int
) -> tuple[list[float], int, int, list[str]]:
    """A burst of users of one app: ``questions`` prompts that start with one
    system prompt of ``system_words`` tokens, asked once before, each with a
    question of its own, submitted at once for one token each, so that what
    is timed is their prefill. ``keep``: whether the slots keep their pages
    for prompts that start the same way (:mod:`helpers.engine.page_index`),
    on the engine's own cache, so both settings run on one KV reservation.
    Each question's seconds to its token, the prompt tokens found kept, the
    forward passes, and each question's token as text: ``seed`` picks the
    prompts, so runs of one seed with and without kept pages can be compared."""
    rows = engine._batcher._rows
    assert isinstance(rows, paged_rows.PagedRows), "kept pages are the slots layout's"
    rows.keeps_prefixes = keep
    system = prompts(1, seed=seed, words=system_words)[0]
    one_token = Sampling(1, temperature=0.0, top_p=1.0)
    engine.generate([GenerationRequest(system + prompts(1, seed=seed + 1)[0], one_token)])
    burst = [GenerationRequest(system + q, one_token) for q in prompts(questions, seed=seed + 2)]
    passes, started = engine.stats.forward_passes, time.perf_counter()
    with engine.together():  # one admission, as a burst that arrives in one step is
        futures = [engine.submit(request) for request in burst]
    seconds = [time.perf_counter() - started for _ in as_completed(futures)]
    rows.keeps_prefixes = False
    done = [future.result() for future in futures]
    kept = sum(completion.cached_tokens for completion in done)
    return seconds, kept, engine.stats.forward_passes - passes, [c.text for c in done]


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


def layer_steps(engine: Engine, batches: list[int], past: int, graphs: str) -> None:
    """A decode step with torch's operations between the matrix products and
    with the fused kernels (where the engine runs them: on a GPU, where they
    passed their check), at each batch size, and whether both give each row
    the same greedy token."""
    fused = fused_ops(engine)
    say(f"| sequences | decode step at {past} positions ({graphs}): torch's layer steps | fused |")
    say("|---|---|---|")
    agree, rows, largest = 0, 0, 0.0
    for batch in batches:
        plain, expected = decode_step_ms(engine, batch, past, LayerOps())
        joined = "not run here"
        if fused is not None:
            ms, logits = decode_step_ms(engine, batch, past, fused)
            joined = f"{ms:.3f} ms"
            agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
            rows += batch
            largest = max(largest, float((logits - expected).abs().max()))
        say(f"| {batch} | {plain:.3f} ms | {joined} |")
    if rows:
        say(
            f"fused and torch's layer steps: the same greedy token for {agree} of {rows} rows, "
            f"logits at most {largest:.3g} apart"
        )


def fused_ops(engine: Engine) -> LayerOps | None:
    """The engine's fused layer steps, where it runs them."""
    return None if type(engine.model.ops) is LayerOps else engine.model.ops


def count_kernels(engine: Engine) -> None:
    """The kernels a decode step launches with torch's layer steps and fused."""
    fused = fused_ops(engine)
    if fused is None or engine.device.type != "cuda":
        return
    try:
        counts = [gpu_kernels_per_step(engine, ops) for ops in (LayerOps(), fused)]
    except Exception as err:  # the profiler's CUDA tracing is missing on some machines
        counts, reason = [], f"{type(err).__name__}: {err}"
    else:
        reason = "the profiler saw none"
    if counts and all(counts):
        say(
            f"GPU kernels a decode step launches: {counts[0]} with torch's layer steps, "
            f"{counts[1]} fused"
        )
    else:
        say(f"GPU kernels a decode step launches: not counted ({reason})")


def say(text: str) -> None:
    """Print one figure as soon as it is measured: a run cut short by its
    time limit keeps what it had."""
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
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
        help="decoder layers (the shape's own by default; fewer for a quick run)",
    )
    parser.add_argument(
        "--nano-vllm-requests",
        type=int,
        help=f"requests of nano-vllm's workload ({NANO_VLLM['requests']} on a GPU, none on CPU)",
    )
    parser.add_argument(
        "--nano-vllm-lengths",
        type=int,
        nargs=2,
        default=[NANO_VLLM["shortest"], NANO_VLLM["longest"]],
        help="the workload's shortest and longest prompt and output",
    )
    parser.add_argument(
        "--long-prompt-words",
        type=int,
        help=(
            f"words of the long-context prompt ({LONG_CONTEXT_WORDS} on a GPU, or the "
            "context less one token where shorter; none on CPU)"
        ),
    )
    parser.add_argument(
        "--shared-prompt",
        help=f"QUESTIONSxWORDS of the burst after one system prompt ({SHARED_PROMPT} on a "
        "GPU, none on CPU)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["256x1024", "1x32768"],
        help="ROWSxPOSITIONS shapes of the one-layer attention comparison "
        "(positions cut to the context)",
    )
    parser.add_argument(
        "--step-batches",
        type=int,
        nargs="+",
        default=[1, 8, 64],
        help="sequences in the decode-step comparison (each with a cache of its own "
        "beside the engine's)",
    )
    parser.add_argument(
        "--step-positions",
        type=int,
        default=512,
        help="positions deep each row is in the decode-step comparison",
    )
    parser.add_argument("--ready-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ready_from:
        report_readiness(args.ready_from, args.device)
        return
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    workload = args.nano_vllm_requests
    if workload is None:
        workload = NANO_VLLM["requests"] if args.device == "cuda" else 0
    with tempfile.TemporaryDirectory(prefix=f"random-{args.shape}-") as folder:
        directory = Path(folder)
        write_checkpoint(directory, args.shape, layers)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(f"device: {name}, torch {torch.__version__}, {sys.executable}")
        print(f"model: {args.shape}'s shape, {layers} layers, random weights", flush=True)
        for _ in range(2):
            try:
                ready = readiness(directory, args.device)
            except subprocess.SubprocessError as err:  # the figures below need no fresh process
                stderr = getattr(err, "stderr", None) or ""
                print(f"readiness failed: {err}\n{stderr[-2000:]}", flush=True)
                break
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
        say(f"same greedy text from slots and the padded cache: {agree} of {checked} prompts")
        # Long prompts: each sequence spans many pages (and where the cache has
        # no fixed size, on CPU, it grows past its first pages for them), and
        # is prefilled a piece at a time.
        with mock.patch.object(paged_rows, "PREFILL_TOKENS", CHECK_PIECE_TOKENS):
            grown = same_text(slots, padded, count=long_checked, tokens=32, words=LONG_PROMPT_WORDS)
        say(
            f"the same with long prompts ({LONG_PROMPT_WORDS} words, prefilled in pieces of "
            f"{CHECK_PIECE_TOKENS} tokens or fewer, 32 tokens each): {grown} of {long_checked} "
            "prompts"
        )
        graphs = "CUDA graphs" if args.device == "cuda" else "eager"
        started = time.perf_counter()
        with HealthChecks(slots) as checks:  # as Serve's, while graphs are captured
            for batch in args.batches:  # the first pass of each shape captures its graphs
                engine_run(slots, batch, args.max_tokens)
        say(
            f"first pass at each batch size ({graphs}, captured then): "
            f"{time.perf_counter() - started:.2f} s"
        )
        say(f"health checks during that pass, on another thread: {checks.summary()}")
        say(f"first token, one request on an idle engine: {first_token_s(slots) * 1000:.1f} ms")
        loop = loop_tokens_per_s(directory, args.device, args.loop_requests, args.max_tokens)
        say(f"walkthrough loop ({args.loop_requests} requests in turn): {loop:.0f} tok/s")
        say(f"| sequences | engine tok/s (slots, {graphs}) | ms per step | versus the loop |")
        say("|---|---|---|---|")
        for batch in args.batches:
            tok_s, step_ms = engine_run(slots, batch, args.max_tokens)
            say(f"| {batch} | {tok_s:.0f} | {step_ms:.2f} | {tok_s / loop:.1f}x |")
        tok_s, step_ms = engine_run(slots, largest, args.max_tokens, streamed=True)
        say(f"streamed, {largest} sequences: {tok_s:.0f} tok/s, {step_ms:.2f} ms per step")
        engine_run(padded, largest, 8)
        tok_s, step_ms = engine_run(padded, largest, args.max_tokens)
        say(
            f"padded cache, eager (the CPU layout), {largest} sequences: "
            f"{tok_s:.0f} tok/s, {step_ms:.2f} ms per step"
        )
        alone = forward_ms(slots, largest, PROMPT_WORDS + args.max_tokens // 2)
        say(f"model forward alone, eager, {largest} rows: {alone:.2f} ms per step")
        if workload:
            shortest, longest = args.nano_vllm_lengths
            # Again, as a server that has run a while meets it: its shapes captured.
            for run in (
                f"nano-vllm's workload ({workload} requests, prompts and outputs of {shortest} "
                f"to {longest} tokens, EOS ignored, {largest} at once)",
                "the same workload again",
            ):
                tokens, seconds, passes, captured = nano_vllm_run(
                    slots, workload, shortest, longest
                )
                say(
                    f"{run}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.0f} output "
                    f"tok/s; {passes} forward passes, {captured} step shapes first captured "
                    "in them"
                )
        if args.device == "cuda":  # before the measurements below add their own
            peak = torch.cuda.max_memory_allocated() / 2**30
            say(
                f"GPU memory at its peak, caches and graphs included: {peak:.2f} GiB "
                "(the KV pages take GPU_MEMORY_FRACTION's budget at load)"
            )
        layer_steps(slots, args.step_batches, args.step_positions, graphs)
        long_words = args.long_prompt_words
        if long_words is None:
            on_gpu = args.device == "cuda"
            long_words = min(LONG_CONTEXT_WORDS, slots.context_length - 1) if on_gpu else 0
        if long_words:
            seconds, passes, gib = long_prompt_run(slots, long_words)
            kept = ""
            if args.device == "cuda":
                share = GPU_SHARE * torch.cuda.get_device_properties(0).total_memory
                kept = f" (the share keeps {ACTIVATION_SHARE * share / 2**30:.2f} GiB for them)"
            say(
                f"a {long_words}-token prompt alone, prefilled in {passes} "
                f"pass{'es' if passes > 1 else ''}: first token in "
                f"{seconds:.2f} s, {gib:.2f} GiB of activations at its peak{kept}"
            )
        shared = args.shared_prompt or (SHARED_PROMPT if args.device == "cuda" else None)
        if shared:
            questions, system_words = map(int, shared.split("x"))
            # Each setting first, in turn. A pair of runs shares its prompts,
            # so its tokens compare; the next pair has a system prompt of its own.
            # A run without kept pages indexes none, so the one after it finds
            # only its own system prompt, asked once before as in the first pair.
            texts: dict[bool, list[str]] = {}
            for run, keep in enumerate((True, False, False, True)):
                seconds, kept, passes, texts[keep] = shared_prompt_run(
                    slots, questions, system_words, keep, seed=10 * (run // 2)
                )
                say(
                    f"kept pages {'on' if keep else 'off'}, {questions} questions of "
                    f"{PROMPT_WORDS} tokens after one {system_words}-token system prompt, at "
                    f"once: first tokens in {statistics.median(seconds) * 1000:.0f} ms "
                    f"(median), {max(seconds) * 1000:.0f} ms (slowest); {kept} of "
                    f"{questions * (system_words + PROMPT_WORDS)} prompt tokens found kept; "
                    f"{passes} forward pass{'es' if passes != 1 else ''}"
                )
                if run % 2:
                    same = sum(a == b for a, b in zip(texts[True], texts[False], strict=True))
                    say(
                        f"kept pages on and off, the same prompts: the same greedy token for "
                        f"{same} of {questions} questions"
                    )
        for shape in args.attention:
            sequences, positions = map(int, shape.split("x"))
            positions = min(positions, slots.context_length - 1)
            in_place, gathered = attention_ms(slots, sequences, positions)
            kernel = "not run here" if in_place is None else f"{in_place:.3f} ms"
            say(
                f"decode attention alone, one layer, {sequences} row"
                f"{'s' if sequences > 1 else ''} of {positions} positions: "
                f"reading the pages in place (the kernel) {kernel}, gathering them for "
                f"torch's attention {gathered:.3f} ms"
            )
        count_kernels(slots)


if __name__ == "__main__":
    main()
