"""The int8 Q8_0 kernel (helpers/engine/int8_matmul.c), held to the same
product computed independently in torch: the rows quantized per block of 32
as the kernel's docstring says, the integer sums in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.engine import int8_linear
from helpers.engine.cpu_weights import quantize_q8_0
from helpers.engine.int8_linear import Int8Linear

pytestmark = pytest.mark.skipif(
    int8_linear.kernels() is None,
    reason="the int8 kernel needs an x86-64 CPU with AVX512-VNNI and a C compiler",
)


def layer_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    out, width = weight.shape
    layer = Int8Linear(width, out, bias=bias is not None)
    for name, tensor in int8_linear.pack(*quantize_q8_0(weight)).items():
        getattr(layer, name).copy_(tensor)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def expected_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows and weights on Q8_0 blocks, multiplied in float64. The rows'
    rounding is done in fp32 as the kernel does it (d = amax / 127, x times
    1/d, ties to even), so both see the same quants."""
    rows, width = x.shape
    blocks = x.view(rows, width // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    quants = torch.round(blocks * torch.where(d == 0, 0.0, 1 / d))
    weight_quants, weight_scales = quantize_q8_0(weight)
    w = weight_quants.view(weight.shape[0], width // 32, 32).double()
    sums = torch.einsum("mbk,nbk->mnb", quants.double(), w)
    return (sums * d.double().squeeze(-1)[:, None, :] * weight_scales.double()[None]).sum(-1)


# Rows 1 to 9 take every tile height (1 to 4 rows) and split unevenly; 16 to
# 112 outputs leave 0 to 3 groups of 16 past the last four.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize(("width", "out"), [(32, 16), (96, 48), (256, 80), (128, 112), (64, 64)])
def test_the_product_is_the_quantized_rows_times_the_quantized_weights(
    rows: int, width: int, out: int
) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + width + out)
    weight = torch.randn(out, width, generator=generator)
    x = torch.randn(rows, width, generator=generator) * 3
    x[0, :32] = 0  # a block of zeros: scale 0, quants 0
    got = layer_from(weight)(x)
    expected = expected_product(x, weight)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_rows_with_outliers_keep_the_other_blocks_exact() -> None:
    """A row's scale is per block of 32: one huge input coarsens its own block
    and no other."""
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4))
    x[0, 5] = 1e4
    got = layer_from(weight)(x).double()
    torch.testing.assert_close(got, expected_product(x, weight), rtol=1e-5, atol=1e-2)
    plain = x.clone()
    plain[0, :32] = 0
    unaffected = layer_from(weight)(plain).double()
    torch.testing.assert_close(unaffected, expected_product(plain, weight), rtol=1e-5, atol=1e-4)


def test_threads_split_the_outputs_without_changing_a_bit() -> None:
    weight = torch.randn(16 * 9, 256, generator=torch.Generator().manual_seed(5))
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6))
    layer = layer_from(weight, bias=torch.randn(16 * 9))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = layer(x)
        torch.set_num_threads(2)
        shared = layer(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(alone, shared)


def test_it_keeps_nn_linears_shapes_and_adds_the_bias() -> None:
    linear = nn.Linear(64, 32)
    layer = layer_from(linear.weight.detach(), linear.bias.detach())
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = linear(x)
    got = layer(x)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.03)


def test_bad_rows_and_shapes_are_refused() -> None:
    layer = layer_from(torch.randn(16, 32))
    for bad in (torch.ones(1, 32, dtype=torch.float16), torch.ones(1, 64)):
        with pytest.raises(ValueError, match="fp32 CPU rows of 32"):
            layer(bad)
    with pytest.raises(ValueError, match="groups of 16"):
        Int8Linear(32, 24)
    assert not int8_linear.fits(32, 24) and not int8_linear.fits(48, 16)
    assert int8_linear.fits(32, 16)
