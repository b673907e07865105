"""Output tokens/s of the engine alone: no Ray, no HTTP, one process.

    python -m bench.engine_direct --threads 2 --batch 16      (--help for more)

The ceiling the app can reach on this machine: the same ``Engine`` the
replicas run, fed ``--batch`` greedy requests at once. The gap between this
and ``bench.versus_transformers`` is what Ray, the ingress and HTTP cost.
By default it compares that batch with one request alone, the same engine:
what continuous batching gives. ``--int8-dynamic`` measures the same engine
after torch's dynamic int8 quantization of its linear layers, in the same
run: a speed the app does not
use, since it changes the model's output. ``--mkl`` measures fp32 linear layers
prepacked for oneDNN (``helpers/engine/cpu_linear.py``) against the same without
prepacking, that is with torch's default BLAS, MKL.
"""

import argparse
import time

import torch

from helpers.config import ServeConfig
from helpers.engine.engine import Engine, GenerationRequest, Sampling


def tokens_per_s(engine: Engine, batch: int, max_tokens: int) -> tuple[float, str]:
    prompts = [
        engine.format_prompt(f"Tell a long story about the number {i}.", "auto")
        for i in range(batch)
    ]
    engine.generate([GenerationRequest(prompts[0], Sampling(8, 0.0, 1.0))])  # warm-up
    if engine.tuned is not None:  # the prepacking finishes once the warm-up ends
        engine.tuned.result()
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    started = time.perf_counter()
    completions = engine.generate([GenerationRequest(p, sampling) for p in prompts])
    seconds = time.perf_counter() - started
    return sum(c.completion_tokens for c in completions) / seconds, completions[0].text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--int8-dynamic", action="store_true")
    variant.add_argument("--mkl", action="store_true")
    variant.add_argument("--fp32", action="store_true")
    args = parser.parse_args()
    config = ServeConfig.from_env()

    def load(prepack: bool = True, cpu_weights: str = "auto") -> Engine:
        return Engine.load(
            config.model_id,
            config.model_cache_dir,
            cpu_threads=args.threads,
            max_batch_size=max(args.batch, 1),
            prepack=prepack,
            cpu_weights=cpu_weights,
        )

    engine = load(cpu_weights="float32" if args.mkl else "auto")
    print(f"load {engine.load_times}, threads {args.threads}, batch {args.batch}")
    rate, text = tokens_per_s(engine, args.batch, args.max_tokens)
    layers = "fp32, oneDNN" if args.mkl else "default"
    print(f"{layers + ':':13} {rate:6.1f} output tok/s  ({text[:50]!r})")
    if not (args.mkl or args.fp32 or args.int8_dynamic):
        alone, _ = tokens_per_s(engine, 1, args.max_tokens)
        print(
            f"{'one alone:':13} {alone:6.1f} output tok/s; the batch of {args.batch} "
            f"{rate / alone:.2f}x"
        )
    if args.mkl or args.fp32:
        other = load(prepack=args.fp32, cpu_weights="float32")
        other_rate, other_text = tokens_per_s(other, args.batch, args.max_tokens)
        same = "same text" if other_text == text else "text differs"
        name = "fp32, oneDNN" if args.fp32 else "fp32, MKL"
        print(f"{name + ':':13} {other_rate:6.1f} output tok/s  ({same}); {rate / other_rate:.2f}x")
    if args.int8_dynamic:
        quantized_engine = load(prepack=False, cpu_weights="float32")
        torch.ao.quantization.quantize_dynamic(
            quantized_engine.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
        quantized, text = tokens_per_s(quantized_engine, args.batch, args.max_tokens)
        print(
            f"int8 (dyn.):  {quantized:6.1f} output tok/s  ({text[:50]!r}), {quantized / rate:.2f}x"
        )


if __name__ == "__main__":
    main()
