"""Shared test setup.

Ray reads some settings when it is first imported, so the loopback-only and
token-auth environment (the same as ``scripts/ray_env.sh``) is set here, before
any test module imports Ray. The interpreter's own bin directory goes first on
PATH, as in an activated virtual environment, so tests that run the ``ray``
and ``serve`` commands get this environment's.
"""

import os
import sys
from pathlib import Path

import pytest

from helpers.ray_env import apply_ray_env

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

apply_ray_env()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The paged decode kernel is Triton's; in the tests Triton's interpreter runs
# it on CPU tensors, on any machine (tests/triton_interpreter.py). Triton reads
# this once, when imported. Processes the tests start inherit it: none of them
# runs the kernel, which runs only on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

TIERS = ("unit", "model", "integration", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, the folder under tests/ it lives in."""
    tests = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(tests).parts if item.path.is_relative_to(tests) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(parts[0])
