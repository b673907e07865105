"""Output tokens/s of the engine alone: no Ray, no HTTP, one process.

    python -m bench.engine_direct --threads 2 --batch 16      (--help for more)

The ceiling the app can reach on this machine: the same ``Engine`` the
replicas run, fed ``--batch`` greedy requests at once. The gap between this
and ``bench.versus_transformers`` is what Ray, the ingress and HTTP cost.
``--int8-dynamic`` measures the same engine after torch's dynamic int8
quantization of its linear layers, in the same run: a speed the app does not
use, since it changes the model's output. ``--onednn`` measures it with every
linear layer's weights prepacked for oneDNN instead of torch's default BLAS
(MKL), which on this AMD machine runs a generic code path.
"""

import argparse
import time

import torch

from helpers.config import ServeConfig
from helpers.engine import Engine, GenerationRequest, Sampling


def tokens_per_s(engine: Engine, batch: int, max_tokens: int) -> tuple[float, str]:
    prompts = [
        engine.format_prompt(f"Tell a long story about the number {i}.", "auto")
        for i in range(batch)
    ]
    engine.generate([GenerationRequest(prompts[0], Sampling(8, 0.0, 1.0))])  # warm-up
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0)
    started = time.perf_counter()
    completions = engine.generate([GenerationRequest(p, sampling) for p in prompts])
    seconds = time.perf_counter() - started
    return sum(c.completion_tokens for c in completions) / seconds, completions[0].text


class OneDnnLinear(torch.nn.Module):
    """A linear layer whose weight oneDNN has reordered once, ahead of time."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_onednn(model: torch.nn.Module, batch_hint: int) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, OneDnnLinear(child, batch_hint))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--int8-dynamic", action="store_true")
    variant.add_argument("--onednn", action="store_true")
    args = parser.parse_args()
    config = ServeConfig.from_env()
    engine = Engine.load(
        config.model_id,
        config.model_cache_dir,
        cpu_threads=args.threads,
        max_batch_size=max(args.batch, 1),
    )
    print(f"load {engine.load_times}, threads {args.threads}, batch {args.batch}")
    rate, text = tokens_per_s(engine, args.batch, args.max_tokens)
    print(f"fp32:        {rate:6.1f} output tok/s  ({text[:50]!r})")
    if args.onednn:
        use_onednn(engine.model, args.batch)
        packed, packed_text = tokens_per_s(engine, args.batch, args.max_tokens)
        same = "same text" if packed_text == text else "text differs"
        print(f"oneDNN:      {packed:6.1f} output tok/s  ({same}), {packed / rate:.2f}x")
    if args.int8_dynamic:
        torch.ao.quantization.quantize_dynamic(
            engine.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
        quantized, text = tokens_per_s(engine, args.batch, args.max_tokens)
        print(
            f"int8 (dyn.): {quantized:6.1f} output tok/s  ({text[:50]!r}), {quantized / rate:.2f}x"
        )


if __name__ == "__main__":
    main()
