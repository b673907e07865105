"""Show the configuration as a table, and check for a GPU, in a notebook."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Mapping

from helpers.config import VARIABLES, ServeConfig


def config_rows(
    config: ServeConfig, environ: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """One row per variable: name, value in use, default, accepted range, meaning.

    ``set`` says whether the value came from the environment or the default.
    """
    env = os.environ if environ is None else environ
    values = config.as_env()
    return [
        {
            "variable": var.name,
            "value": _shown(values[var.name], var.secret),
            "set": "environment" if var.name in env else "default",
            "default": var.default,
            "accepted": var.accepted,
            "meaning": var.meaning,
        }
        for var in VARIABLES
    ]


def _shown(value: str, secret: bool) -> str:
    if not secret:
        return value
    return "(set, hidden)" if value else "(not set)"


def config_markdown(config: ServeConfig, environ: Mapping[str, str] | None = None) -> str:
    """The rows as a Markdown table (``IPython.display.Markdown`` renders it)."""
    rows = config_rows(config, environ)
    header = "| Variable | Value | From | Default | Accepted | Meaning |\n|---|---|---|---|---|---|"
    lines = [
        f"| `{r['variable']}` | `{r['value']}` | {r['set']} | `{r['default']}` "
        f"| {r['accepted']} | {r['meaning']} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def gpu_advice() -> str:
    """Suggest ``NUM_GPUS_PER_REPLICA=1`` on a GPU; warn, never fail, without one."""
    name = gpu_name()
    if name:
        return f"GPU found ({name}): set NUM_GPUS_PER_REPLICA=1 to serve on it."
    message = "No GPU found: the model runs on the CPU (fine for the embedded 135M model)."
    warnings.warn(message, stacklevel=2)
    return message


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, as ``nvidia-smi`` gives it: asked of the
    driver's tool rather than torch, which a notebook's kernel never loads."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return names[0].strip() if names else None
