"""The kit's ``pyproject.toml`` as data, for tests that hold other files to it."""

import tomllib
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project() -> dict[str, Any]:
    """The ``[project]`` table."""
    return tomllib.loads(PYPROJECT.read_text())["project"]
