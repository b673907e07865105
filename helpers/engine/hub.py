"""Hub ids: ``MODEL_ID`` resolved to a local snapshot directory, downloaded once.

Why the kit resolves a hub id itself instead of handing it to
``from_pretrained``:

- **The fast path.** The engine then loads a hub model from a directory, like
  any local checkpoint, so a safetensors Llama runs on the kit's own ``Llama``
  and tokenizer rather than only through transformers.
- **One download, before the deadline.** ``build_app`` calls this at deploy
  time, with a progress bar in the terminal of ``serve run`` (or the
  notebook). A model replica that starts later, and every request waiting for
  it, finds the files in the Hugging Face cache: nothing is fetched inside a
  request's ``REQUEST_TIMEOUT_S``.
- **Only what serving reads.** Config, generation config, the weights in
  safetensors (``pytorch_model*.bin`` only for a repository that has no
  safetensors, as transformers would), the tokenizer and chat template. Not
  the ONNX, GGUF, TensorFlow, Flax or ``consolidated.*`` copies that many
  repositories carry besides, which can be several times the model's size.
- **Cache first.** A complete snapshot already in the cache is used without
  any network call; with ``HF_HUB_OFFLINE=1`` the network is never touched.
  (A cached model is not refreshed: delete its cache entry to fetch a newer
  revision.)
- **One readable error.** Every failure is a :class:`ModelLoadError` whose
  message starts ``MODEL_ID='<id>' cannot be loaded:`` and gives one reason:
  an invalid id, no such repository, a gated one (set ``HF_TOKEN``), or
  neither cached nor reachable.

``huggingface_hub`` reads ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache
lies), ``HF_TOKEN`` (gated and private repositories) and ``HF_ENDPOINT`` (a
mirror). This module imports neither torch, transformers nor Ray, and
``huggingface_hub`` only when a hub id is resolved, so the deploying driver
and the notebook kernel can call it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.errors import ModelLoadError

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")
"""One of these makes a tokenizer (``tokenizer_config.json`` alone does not)."""

SERVING_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    *TOKENIZER_FILES,
)
"""Files at a repository's root that a serving engine reads, besides weights."""

SAFETENSORS_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors")
BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model-*-of-*.bin")
WEIGHT_INDEXES = {
    SAFETENSORS_WEIGHTS: "model.safetensors.index.json",
    BIN_WEIGHTS: "pytorch_model.bin.index.json",
}
"""The weight files transformers loads (never ``consolidated.*``), and the
index that lists a sharded checkpoint's pieces."""

_TRUE = {"1", "ON", "YES", "TRUE"}
_NETWORK_LIBRARIES = {"httpx", "httpx2", "requests", "urllib3"}
"""Whose errors mean the hub could not be reached (huggingface_hub's HTTP
client differs between versions)."""


def is_hub_id(model_id: str) -> bool:
    """Whether ``MODEL_ID`` is resolved through the hub.

    Not the embedded model, not a ``.gguf`` file (existing or not: the engine
    reports a missing one) and not an existing path. Anything else is a hub id,
    even one the hub would refuse (``/no/such/dir``): :func:`snapshot_directory`
    then says why it cannot be loaded. The engine and the app share this one
    decision.
    """
    if model_id == EMBEDDED_MODEL_ID:
        return False
    path = Path(model_id).expanduser()
    return path.suffix != ".gguf" and not path.exists()


def serving_files(repo_files: Iterable[str]) -> list[str]:
    """The files of a repository that serving needs, from its file list.

    Root-level files only: config, tokenizer, chat template, and the weights
    in safetensors, or in ``pytorch_model*.bin`` when there are no safetensors.
    """
    root = sorted(name for name in repo_files if "/" not in name)
    wanted = [name for name in root if _matches(name, SERVING_FILES)]
    for weights in (SAFETENSORS_WEIGHTS, BIN_WEIGHTS):
        found = [name for name in root if _matches(name, weights)]
        if found:
            index = WEIGHT_INDEXES[weights]
            return sorted(wanted + found + ([index] if index in root else []))
    return wanted


def snapshot_directory(model_id: str) -> Path:
    """The local directory holding hub model ``model_id``, downloading it if need be.

    The cache is tried first, with no network call. Otherwise, unless
    ``HF_HUB_OFFLINE=1``, the serving files are downloaded into the cache with
    huggingface_hub's progress bars. Raises :class:`ModelLoadError` naming the
    id and one reason when it is neither cached nor downloadable.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError as err:
        raise _error(
            model_id,
            "it is neither an existing directory, a .gguf file nor a hub id ('org/name')",
        ) from err
    cached = _cached_snapshot(model_id)
    if cached is not None:
        return cached
    if _offline(constants.HF_HUB_OFFLINE):
        raise _error(
            model_id,
            f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "and HF_HUB_OFFLINE=1 forbids downloading it",
        )
    try:
        return _download(model_id)
    except ModelLoadError:
        raise
    except Exception as err:  # every hub or network failure becomes one readable reason
        raise _error(model_id, _reason(model_id, err)) from err


def _cached_snapshot(model_id: str) -> Path | None:
    """The cached snapshot of the default revision, if it holds a whole model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(model_id, local_files_only=True, allow_patterns=[CONFIG_FILE])
    except LocalEntryNotFoundError:
        return None
    path = Path(folder)
    return path if is_complete(path) else None


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a config, a tokenizer and every weight file.

    A cache entry can be partial (an interrupted download, or another tool
    that fetched only ``config.json``): such a one is downloaded again.
    """
    if not (directory / CONFIG_FILE).is_file():
        return False
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if not any(_matches(name, TOKENIZER_FILES) for name in names):
        return False
    for weights, index in WEIGHT_INDEXES.items():
        if index in names:
            try:
                shards = set(json.loads((directory / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False
            return shards <= names
        if any(_matches(name, weights) for name in names):
            return True
    return False


def _download(model_id: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    info = HfApi(endpoint=endpoint).model_info(model_id)
    files = serving_files(sibling.rfilename for sibling in info.siblings or [])
    if CONFIG_FILE not in files:
        raise _error(model_id, "the repository has no config.json at its root")
    if not any(_matches(name, SAFETENSORS_WEIGHTS + BIN_WEIGHTS) for name in files):
        raise _error(
            model_id,
            "the repository has no model*.safetensors or pytorch_model*.bin weights at its root",
        )
    if not any(_matches(name, TOKENIZER_FILES) for name in files):
        raise _error(model_id, "the repository has no tokenizer file at its root")
    where = endpoint or constants.ENDPOINT
    print(
        f"Downloading {model_id} ({len(files)} files) from {where} into {constants.HF_HUB_CACHE}",
        file=sys.stderr,
        flush=True,
    )
    folder = Path(snapshot_download(model_id, allow_patterns=files, endpoint=endpoint))
    if not is_complete(folder):
        raise _error(model_id, f"the download into {folder} is incomplete; run it again")
    return folder


def _reason(model_id: str, err: Exception) -> str:
    """One readable reason for a failed download."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
    token = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "no HF_TOKEN"
    if isinstance(err, GatedRepoError):
        return (
            f"the repository is gated ({token} given): accept its terms at "
            f"{endpoint}/{model_id} and set HF_TOKEN to a token of that account"
        )
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"no repository {model_id!r} on {endpoint} "
            f"(a private or gated one needs HF_TOKEN; {token} given)"
        )
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return (
            f"the hub refused access (HTTP {status}, {token} given): "
            "set HF_TOKEN to a token with access"
        )
    if isinstance(err, HfHubHTTPError) and status is not None:
        return f"the hub at {endpoint} answered HTTP {status}"
    if isinstance(err, OSError) or type(err).__module__.split(".")[0] in _NETWORK_LIBRARIES:
        return (
            f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and the hub at {endpoint} cannot be reached ({type(err).__name__})"
        )
    first_line = next(iter(str(err).strip().splitlines()), "")
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__


def _error(model_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"MODEL_ID={model_id!r} cannot be loaded: {reason}")


def _offline(hub_offline: bool) -> bool:
    """Offline when huggingface_hub read it at import, or the variable says so now."""
    return hub_offline or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)
