"""The fused layer steps, in Triton's interpreter, against torch's operations:
at every family's widths, for a decode step's rows and a prefill's, in both
half precisions and float32. Each kernel rounds where torch does, so only the order
of a sum (an RMSNorm's) or an exponential's last bit can differ."""

import pytest
import torch

from helpers.engine.layer_ops import LayerOps, RMSNorm
from helpers.engine.llama_config import LlamaConfig
from tests.triton_interpreter import fused_layer_ops

FUSED = fused_layer_ops([])  # or the module is skipped, without Triton
from helpers.engine import fused_layer_ops as fused_module  # noqa: E402

TORCH = LayerOps()
CPU = torch.device("cpu")
SHAPES = {  # hidden, MLP width, query heads, key-value heads, head dim
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64),
    "qwen3-0.6b": (1024, 3072, 16, 8, 128),
    "llama3.2-1b": (2048, 8192, 32, 8, 64),
    "odd widths": (40, 72, 6, 2, 12),
}
TOKENS = {"decode step": (3, 1), "prefill": (2, 7)}  # rows, new tokens a row
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""A GPU from Ampere on runs bfloat16 (``DTYPE=auto``); before it, float16."""
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 5e-2, torch.float32: 1e-5}
"""One unit in float16's last place, a sum's order in float32. Triton's
interpreter rounds bfloat16 toward zero where a GPU and torch round to
nearest, at each of up to four roundings in a row (Qwen3's norm, its
weight, then RoPE's two products), so there a result may be a few units off."""


def config_of(shape: str) -> LlamaConfig:
    hidden, inner, heads, kv_heads, head_dim = SHAPES[shape]
    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to rounding (:data:`TOLERANCE`), and laid out alike."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert laid_out(got) == laid_out(expected), "laid out as torch lays out its result"
    tolerance = TOLERANCE[got.dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def laid_out(tensor: torch.Tensor) -> list[int]:
    """Strides of the dimensions longer than one: those of the others never matter."""
    return [stride for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1]


def random(generator: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_each_step_gives_torchs_result(shape: str, tokens: str, dtype: str) -> None:
    hidden, inner, heads, kv_heads, head_dim = SHAPES[shape]
    rows, new = TOKENS[tokens]
    kind = DTYPES[dtype]
    generator = torch.Generator().manual_seed(len(shape) + new)
    # The residual stream is float32 beside float16 layers (Llama's docstring).
    stream_dtype = torch.float32 if kind == torch.float16 else kind
    stream = random(generator, rows * new, hidden, dtype=stream_dtype)
    delta = random(generator, rows * new, hidden, dtype=kind)
    norm = RMSNorm(hidden, 1e-6).to(kind)
    norm.weight.data = random(generator, hidden, dtype=kind)
    for got, expected in zip(
        FUSED.add_norm(stream, delta, norm), TORCH.add_norm(stream, delta, norm), strict=True
    ):
        same(got, expected)
    same(FUSED.norm(stream, norm), TORCH.norm(stream, norm))
    # Queries and keys as Attention.forward hands them over: views of one
    # projection's output (merged on a GPU), heads moved before tokens.
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    projected = random(generator, rows * new, sum(widths), dtype=kind).split(widths, dim=-1)
    queries, keys, _ = (part.view(rows, new, -1, head_dim).transpose(1, 2) for part in projected)
    angles = random(generator, rows, 1, new, head_dim, dtype=torch.float32)
    rope = (angles.cos().to(kind), angles.sin().to(kind))
    head_norms = (RMSNorm(head_dim, 1e-6).to(kind), RMSNorm(head_dim, 1e-6).to(kind))
    for head_norm in head_norms:
        head_norm.weight.data = random(generator, head_dim, dtype=kind)
    for norms in (None, head_norms):  # Qwen3 normalises each head before the rotation
        for got, expected in zip(
            FUSED.rotate(queries, keys, *rope, norms),
            TORCH.rotate(queries, keys, *rope, norms),
            strict=True,
        ):
            same(got, expected)
    # Gate and up, the two halves of one projection's output on a GPU.
    for gate, up in (
        random(generator, rows * new, 2 * inner, dtype=kind).chunk(2, dim=-1),
        (random(generator, rows * new, inner, dtype=kind) for _ in range(2)),
    ):
        same(FUSED.silu_mul(gate, up), TORCH.silu_mul(gate, up))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernels_pass_their_own_check_where_they_run(shape: str) -> None:
    """The check a GPU replica runs before trusting the kernels, here on CPU
    (not in bfloat16, which the interpreter rounds toward zero: a few units
    off, past the check's bound, where a GPU rounds as torch does)."""
    for dtype in (torch.float16, torch.float32):
        assert fused_module.problem_on(CPU, dtype, config_of(shape)) is None


def test_the_check_names_a_step_that_disagrees_with_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel gone wrong (here, RoPE's swap left out) keeps a replica on
    torch's operations, and the reason names the step."""

    def unswapped(queries, keys, cos, signed_sin, norms=None):
        return queries * cos + queries * signed_sin, keys * cos + keys * signed_sin

    monkeypatch.setattr(fused_module.FUSED, "rotate", unswapped)
    fused_module.problem_on.cache_clear()
    try:
        problem = fused_module.problem_on(CPU, torch.float32, config_of("odd widths"))
    finally:
        fused_module.problem_on.cache_clear()
    assert problem is not None and problem.startswith("rotate, output 0:")
