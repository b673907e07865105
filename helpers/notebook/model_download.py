"""Fetch the configured model before deploying (notebook 02's last step).

A hub ``MODEL_ID`` is downloaded here, once, with its progress bar in the
notebook, instead of by a model replica while the first request waits and its
deadline runs. The embedded default and local paths need nothing, and this
says so without touching the network, so the notebooks stay offline under
nbmake. It uses ``helpers.engine.hub``, which imports neither torch nor
transformers: the kernel stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.hub import is_hub_id, snapshot_directory


@dataclass(frozen=True)
class ModelFiles:
    """Where ``MODEL_ID``'s files lie, and what was done to get them."""

    model_id: str
    directory: Path | None
    """The hub snapshot or the local path; None for the embedded model, which
    each replica converts from its PyPI package."""
    note: str

    @property
    def embedded(self) -> bool:
        return self.model_id == EMBEDDED_MODEL_ID


def fetch_model(model_id: str | None = None) -> ModelFiles:
    """Make sure ``model_id`` (default: the configured ``MODEL_ID``) is on this machine.

    A hub id is found in the Hugging Face cache or downloaded into it; a
    failure raises ``ModelLoadError`` naming the id and the reason (not found,
    gated: set ``HF_TOKEN``, hub unreachable). Prints what it did.
    """
    model_id = model_id or ServeConfig.from_env().model_id
    if model_id == EMBEDDED_MODEL_ID:
        files = ModelFiles(model_id, None, "MODEL_ID is the embedded model: nothing to download.")
    elif not is_hub_id(model_id):
        path = Path(model_id).expanduser()
        files = ModelFiles(model_id, path, f"MODEL_ID={model_id!r} is local: nothing to download.")
    else:
        directory = snapshot_directory(model_id)
        files = ModelFiles(model_id, directory, f"MODEL_ID={model_id!r}: files in {directory}")
    print(files.note)
    return files
