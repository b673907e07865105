"""The kit's ``pyproject.toml`` as data, for tests that hold other files to
it. ``tomllib`` is Python 3.11's; on 3.10 the ``test`` extra installs tomli,
the same parser."""

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - run on Python 3.10 only
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project() -> dict[str, Any]:
    """The ``[project]`` table."""
    return tomllib.loads(PYPROJECT.read_text())["project"]
