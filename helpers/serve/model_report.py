"""What a model replica tells ``/healthz`` and ``/v1/models`` about itself,
without being called.

A call to the model deployment goes through the router users' requests go
through: it waits behind a full replica, takes one of the queue's places,
counts as load for the autoscaler, and at zero replicas starts one. So a
replica, once its model is ready, writes what serves the model (``engine``)
and how it started (``model_start``) into Ray's KV store, and the ingress
reads that with the deployment's status (:class:`~helpers.serve.model_calls.ModelStatus`).
Each new replica writes over the last, so the report kept is the latest
start's, and it stays after the replica stops: notebook 05 plots the cold
start it just caused.

The key holds the app's name and a digest of its configuration: after a
redeploy with other settings, the ingress never shows the old model's report,
and a stopping ingress forgets its app's (``serve delete``), so the app
deployed again shows none until its first replica is ready. Values are JSON,
so the ingress reads them without importing the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from helpers.config import ServeConfig
from helpers.serve import ray_private

KV_PREFIX = "llm_kit/model_report/"


def report_key(app_name: str, config: ServeConfig) -> str:
    """Where replicas of ``app_name`` deployed with ``config`` report."""
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:16]
    return f"{KV_PREFIX}{app_name}/{digest}"


def publish(key: str, engine: dict[str, Any], model_start: dict[str, Any]) -> None:
    """From a replica whose model is ready."""
    ray_private.kv_put(key, json.dumps({"engine": engine, "model_start": model_start}))


def read(key: str) -> dict[str, Any] | None:
    """The latest report, or None while no replica has started."""
    raw = ray_private.kv_get(key)
    return None if raw is None else json.loads(raw)


def forget(key: str) -> None:
    """From a stopping ingress; best effort, as its process is going anyway."""
    with contextlib.suppress(Exception):
        ray_private.kv_delete(key)
