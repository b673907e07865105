"""A spare model-replica process, started while nobody waits for it.

Why: most of a cold start is not the model. A new replica's process imports
Ray, Serve and torch before its ``__init__`` runs, and on a small machine that
costs more than loading the weights and the first token together
(``bench/RESULTS.md``, "Cold start"). Ray can start a worker process ahead of
time for a job and runtime env (the raylet's ``PrestartWorkers``), and runs a
runtime env's ``worker_process_setup_hook`` in every worker it starts for it,
before the worker accepts work. So:

1. The model deployment's runtime env names :func:`prepare` as its setup hook,
   and carries :data:`KEY_VARIABLE`: a digest of the configuration and the
   kit's source (:func:`spare_key`).
2. A model replica that stops (a scale-down) asks its node for one process
   with its own runtime env (:func:`ask_for_spare`). In it, :func:`prepare`
   imports what a replica needs, then waits.
3. The next replica Ray starts with the same runtime env is given that
   process, and its constructor runs at once.

What keeps it correct:

- Ray gives a worker only to a task whose runtime env hashes the same, and the
  key is part of it: a redeploy with another ``MODEL_ID``, setting or source
  never meets a process prepared for the old one.
- A spare holds no model memory and reserves no CPU or GPU: an idle Ray worker
  claims no resources, so scale to zero still frees them. What it costs at
  rest is its resident memory (README: "Cold starts").
- A spare lives only while the app does: the ingress holds an entry for the
  key in Ray's KV store while it runs, and a spare whose key has no holder
  exits (:func:`release_key` runs when the ingress stops, on ``serve delete``
  or a redeploy; ``ray stop`` ends every worker anyway).
- One spare per key and node: spares take a file lock, and one that cannot
  get it leaves after :data:`SURPLUS_WAIT_S`. The lock file holds the spare's
  process id, which the tests follow.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from helpers.config import ServeConfig
from helpers.serve import ray_private

logger = logging.getLogger("ray.serve")

SETUP_HOOK = f"{__name__}.prepare"
KEY_VARIABLE = "LLM_SPARE_KEY"
MODEL_VARIABLE = "LLM_SPARE_MODEL"
"""``MODEL_ID`` and ``MODEL_CACHE_DIR``, as JSON: whose tokenizer a spare loads."""
KV_PREFIX = "llm_kit/spare/"

PRELOADED = ("torch", "helpers.engine.engine", "helpers.serve.model_server")
"""What a replica's process imports before its constructor (torch alone is
most of it); the replica's own Serve wrapper is imported by Ray first."""

CHECK_EVERY_S = 1.0
"""How often a waiting spare checks that its app is still there."""

SURPLUS_WAIT_S = 20.0
"""How long a process of the model deployment that holds no lock waits to be
given a replica before it decides it is a surplus spare and exits. A process
Ray started for a replica is given it well within this."""

KEEP_ALIVE_S = 7 * 24 * 3600
"""How long Ray keeps a prestarted worker it would otherwise reap as idle.
Long: the spare's own checks decide when it goes."""

KIT_SOURCE = Path(__file__).resolve().parents[1]

_tokenizers: dict[str, Any] = {}
"""Loaded by :func:`prepare`, taken by the replica's constructor."""

_waited = threading.Event()
"""Set once this process holds the spare's lock: it waited for a replica."""


def spare_key(config: ServeConfig) -> str:
    """A digest of the configuration and the kit's source files as they are
    now: any change makes spares prepared before it unusable."""
    digest = hashlib.sha256(repr(config).encode())
    for path in sorted(KIT_SOURCE.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(KIT_SOURCE)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def runtime_env(key: str, config: ServeConfig) -> dict[str, Any]:
    """The model deployment's runtime env (Serve merges the app's env vars in)."""
    env_vars = {KEY_VARIABLE: key, MODEL_VARIABLE: _model_of(config)}
    return ray_private.with_setup_hook({"env_vars": env_vars}, SETUP_HOOK)


def prepare() -> None:
    """The setup hook: runs in every process Ray starts for a model replica,
    a spare or not, before it accepts work."""
    key = os.environ.get(KEY_VARIABLE)
    if not key:
        return
    for module in PRELOADED:
        importlib.import_module(module)
    _load_tokenizer(os.environ.get(MODEL_VARIABLE))
    # Serve collects garbage and freezes what survives once a replica's
    # constructor returns, before it reports the replica ready; done here, that
    # full scan of everything imported happens before any request waits for it.
    gc.collect()
    gc.freeze()
    threading.Thread(target=_wait_as_spare, args=(key,), name="spare-worker", daemon=True).start()


def waited_as_spare() -> bool:
    """Whether this process waited as the spare before Ray gave it a replica."""
    return _waited.is_set()


def take_tokenizer(config: ServeConfig) -> Any | None:
    """The tokenizer this process loaded ahead for ``config``'s model, once;
    None in a process that loaded none."""
    return _tokenizers.pop(_model_of(config), None)


def ask_for_spare(key: str) -> None:
    """From a stopping model replica: one process like this one, for whichever
    replica comes next, unless the app is going away (its ingress no longer
    holds the key: ``serve delete``). Best effort: a failure costs the next
    cold start its head start, nothing else."""
    try:
        if ray_private.kv_has_prefix(f"{KV_PREFIX}{key}/"):
            ray_private.prestart_worker_like_this_one(KEEP_ALIVE_S)
    except Exception as err:  # never fail a replica's shutdown over it
        logger.warning("no spare model process: %s", err)


def hold_key(key: str, holder: str) -> None:
    """From the ingress: spares made for ``key`` may wait while it runs."""
    ray_private.kv_put(f"{KV_PREFIX}{key}/{holder}", str(os.getpid()))


def release_key(key: str, holder: str) -> None:
    """From a stopping ingress: spares for ``key`` have nothing to wait for."""
    with contextlib.suppress(Exception):
        ray_private.kv_delete(f"{KV_PREFIX}{key}/{holder}")


def lock_path(key: str) -> Path:
    """Where the spare for ``key`` on this machine holds its lock and writes its pid."""
    return Path(tempfile.gettempdir()) / f"ray-llm-spare-{key}.lock"


def spare_pid(key: str) -> int | None:
    """The waiting spare's process id, if one holds the lock."""
    path = lock_path(key)
    with contextlib.suppress(FileNotFoundError), path.open("r") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(file, fcntl.LOCK_UN)
    return None


def _model_of(config: ServeConfig) -> str:
    """:data:`MODEL_VARIABLE`'s value for ``config``."""
    return json.dumps([config.model_id, str(config.model_cache_dir)])


def _load_tokenizer(model: str | None) -> None:
    """Ahead of the replica: the one part of its model's load that holds no
    weights. A failure leaves it to the replica, which reports it properly."""
    if not model:
        return
    from helpers.engine.engine import load_tokenizer

    model_id, cache_dir = json.loads(model)
    with contextlib.suppress(Exception):
        _tokenizers[model] = load_tokenizer(model_id, Path(cache_dir))


def _wait_as_spare(key: str) -> None:
    """Until Ray gives this process a replica: hold the lock, and leave when
    the app is gone or another spare holds the lock. A process Ray started for
    a replica is given it right after this hook, and never waits."""
    lock = None
    unlocked_s = 0.0
    while not _wait_for_replica(CHECK_EVERY_S):
        if lock is None:
            lock = _try_lock(key)
            if lock is not None:
                _waited.set()
        if lock is None:
            unlocked_s += CHECK_EVERY_S
            if unlocked_s >= SURPLUS_WAIT_S:
                os._exit(0)
        elif not ray_private.kv_has_prefix(f"{KV_PREFIX}{key}/"):
            os._exit(0)
    if lock is not None:
        lock.close()


def _wait_for_replica(seconds: float) -> bool:
    """Whether Ray has given this process a replica (an actor) ``seconds`` from now."""
    import ray

    time.sleep(seconds)
    return ray.get_runtime_context().get_actor_id() is not None


def _try_lock(key: str) -> IO[str] | None:
    file = lock_path(key).open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    file.truncate(0)
    file.write(str(os.getpid()))
    file.flush()
    return file
