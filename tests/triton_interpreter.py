"""The paged decode kernel without a GPU: Triton's interpreter runs it on CPU
tensors (``TRITON_INTERPRET``, set in ``tests/conftest.py`` before anything
imports Triton), so tests hold it to torch's attention on any machine. ``make setup``
installs Triton on Linux x86_64, where its wheels exist; elsewhere these
tests are skipped.
"""

import pytest

pytest.importorskip("triton", reason="make setup installs Triton on Linux x86_64")

from helpers.engine.paged_attention import decode_attention, problem_on

__all__ = ["decode_attention", "problem_on"]
