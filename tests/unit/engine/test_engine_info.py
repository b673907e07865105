"""What ``/healthz`` says serves the model (``helpers.engine.engine.describe``),
for a GPU replica, with no GPU: a stand-in whose weights say they are on one."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from helpers.engine.engine import describe
from helpers.engine.layer_ops import LayerOps


class FusedStandIn(LayerOps):
    """A subclass of torch's steps, as the fused kernels' class is."""


class OnAGpu:
    """The kit's decoder as ``describe`` reads it: its weights' place and
    dtype, its layers, and the kernels chosen for it at load."""

    def __init__(self, decode_kernel: object | None, ops: LayerOps) -> None:
        self.config = SimpleNamespace(family="llama")
        self.decode_kernel, self.ops = decode_kernel, ops

    def parameters(self) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)

    def modules(self) -> list[object]:
        return []


@pytest.mark.parametrize(
    ("decode_kernel", "ops", "kernels"),
    [
        (print, FusedStandIn(), ("paged_attention", "fused_layer_ops")),
        (None, FusedStandIn(), ("fused_layer_ops",)),
        (print, LayerOps(), ("paged_attention",)),
        (None, LayerOps(), ()),
    ],
    ids=["both", "attention failed its check", "layer steps failed theirs", "neither"],
)
def test_a_gpu_replica_says_which_triton_kernels_serve_it(
    decode_kernel: object | None, ops: LayerOps, kernels: tuple[str, ...]
) -> None:
    info = describe(OnAGpu(decode_kernel, ops))  # type: ignore[arg-type]
    assert (info.device, info.dtype, info.implementation) == ("cuda", "bfloat16", "kit-decoder")
    assert info.gpu_kernels == kernels
    assert info.as_dict()["gpu_kernels"] == kernels


def test_off_a_gpu_no_kernel_applies() -> None:
    on_cpu = OnAGpu(None, LayerOps())
    on_cpu.parameters = lambda: iter(
        [SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)]
    )  # type: ignore[method-assign]
    assert describe(on_cpu).gpu_kernels is None  # type: ignore[arg-type]
