"""The environment of a user's shell, for tests that run the kit as users do."""

from __future__ import annotations

import os

from helpers.ray_env import RAY_ENV


def unsourced_env() -> dict[str, str]:
    """This process's environment without the kit's Ray settings: a shell with
    the virtual environment active and nothing sourced, as a user's own
    terminal or JupyterLab has. The kit must apply those settings itself."""
    return {key: value for key, value in os.environ.items() if key not in RAY_ENV}
