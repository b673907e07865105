"""The paged decode kernel without a GPU: Triton's interpreter runs it on CPU
tensors (``TRITON_INTERPRET``, set in ``tests/conftest.py`` before anything
imports Triton), so tests hold it to torch's attention on any machine.
``make setup`` installs Triton on Linux x86_64, where its wheels exist;
elsewhere the tests that run the kernel are skipped, and only those.
"""

from collections.abc import Callable
from typing import Any

import pytest


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
