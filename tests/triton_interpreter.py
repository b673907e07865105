"""A GPU's Triton kernels without a GPU: the paged decode kernel and the fused
layer steps. Triton's interpreter runs them on CPU tensors
(``TRITON_INTERPRET``, set in ``tests/conftest.py`` before anything imports
Triton), so tests hold them to torch on any machine. ``make setup`` installs
Triton on Linux x86_64, where its wheels exist; elsewhere the tests that run
the kernels are skipped, and only those.
"""

from collections.abc import Callable
from typing import Any

import pytest

from helpers.engine.layer_ops import LayerOps

STEPS = ("norm", "add_norm", "rotate", "silu_mul")
""":class:`~helpers.engine.layer_ops.LayerOps`' steps, each a kernel on a GPU."""


def decode_kernel() -> Callable[..., Any]:
    """:func:`helpers.engine.paged_attention.decode_attention`, or a skip
    where Triton is not installed."""
    pytest.importorskip("triton", reason="make setup installs Triton on Linux x86_64")
    from helpers.engine.paged_attention import decode_attention

    return decode_attention


def counted(calls: list[int]) -> Callable[..., Any]:
    """The decode kernel, noting each call in ``calls``: a test that forces
    it on a cache can show its passes really ran it."""
    kernel = decode_kernel()
    return lambda *args: calls.append(1) or kernel(*args)


def fused_layer_ops(calls: list[str]) -> LayerOps:
    """The fused layer steps (:mod:`helpers.engine.fused_layer_ops`), each
    noting its name in ``calls`` when it runs; skipped without Triton."""
    pytest.importorskip("triton", reason="make setup installs Triton on Linux x86_64")
    from helpers.engine.fused_layer_ops import FusedLayerOps

    ops = FusedLayerOps()
    for name in STEPS:
        step = getattr(ops, name)
        setattr(
            ops, name, lambda *args, _step=step, _name=name: calls.append(_name) or _step(*args)
        )
    return ops
