"""Show the configuration as a table, and check for a GPU, in a notebook."""

from __future__ import annotations

import math
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


def gpu_advice(max_replicas: int) -> str:
    """Suggest the ``NUM_GPUS_PER_REPLICA`` that lets ``max_replicas`` run on
    this machine's GPUs at once; warn, never fail, without one."""
    names = gpu_names()
    if names:
        share = gpus_per_replica(len(names), max_replicas)
        shared = f", so MAX_REPLICAS={max_replicas} replicas share them" if share < 1 else ""
        return f"GPU found ({names[0]}): set NUM_GPUS_PER_REPLICA={share:g} to serve on it{shared}."
    message = "No GPU found: the model runs on the CPU (fine for the embedded 135M model)."
    warnings.warn(message, stacklevel=2)
    return message


def gpus_per_replica(gpus: float, max_replicas: int) -> float:
    """The share of a GPU each replica asks for, so that ``max_replicas`` of
    them fit ``gpus`` at once: a whole one where there are enough, else an
    equal part of what there is (0.5 each for two replicas on Colab's one
    GPU), rounded down to the 1/10,000 Ray counts in.

    Why a share: with a whole GPU each, a burst that scales out to a second
    replica waits for a second GPU that does not exist. Each replica keeps
    its KV cache within its share of the memory (``GPU_MEMORY_FRACTION``)."""
    share = min(1.0, gpus / max_replicas)
    return math.floor(share * 10_000) / 10_000


def gpu_names() -> list[str]:
    """Each NVIDIA GPU's name, as ``nvidia-smi`` gives it: asked of the
    driver's tool rather than torch, which a notebook's kernel never loads."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return [line.strip() for line in lines if line.strip()]
