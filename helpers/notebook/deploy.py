"""Deploy, inspect and delete the app from Python, as the notebooks do.

:func:`deploy` is the Python twin of ``serve run ray_serve_app:deployment_graph``:
it reads the configuration the same way (from the environment, plus any
overrides), builds the same application and names it ``RayServeLLM``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.cluster import connect
from helpers.notebook.config_table import gpus_per_replica
from helpers.serve.app import build_app
from helpers.serve.model_calls import state_name
from helpers.serve.model_server import LLMServer


def deploy(overrides: Mapping[str, str] | None = None) -> ServeConfig:
    """Deploy (or redeploy) the app and wait until Serve reports it RUNNING.

    ``overrides`` are environment variables (``{"MAX_REPLICAS": "2"}``); they
    are also written into this process's environment so later cells see them.
    On a cluster with GPUs (Colab's GPU runtime), replicas ask for a share of
    one that lets ``MAX_REPLICAS`` of them run at once (``gpus_per_replica``
    in :mod:`helpers.notebook.config_table`), unless ``NUM_GPUS_PER_REPLICA``
    says otherwise.
    """

    connect()
    os.environ.update(overrides or {})
    _share_the_gpus()
    config = ServeConfig.from_env()
    run_app(config)
    return config


def run_app(config: ServeConfig, model_server: type = LLMServer) -> None:
    """``serve.run`` the app, and say why when a deployment fails.

    Serve's own error names only the deployments that failed; the reason (a
    model that cannot load, say) is in their status messages, added here.
    """
    from ray import serve

    try:
        serve.run(build_app(config, model_server), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:
        application = serve.status().applications.get(APP_NAME)
        reasons = [
            f"{name}: {_summary(deployment.message)}"
            for name, deployment in (application.deployments.items() if application else [])
            if deployment.message
        ]
        raise RuntimeError("\n".join([str(err), *reasons])) from None


def _summary(message: str) -> str:
    """Serve's first line (what failed) and the exception's last line (why),
    without the remote traceback in between."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"


_chosen_share: str | None = None
"""The NUM_GPUS_PER_REPLICA this module last set: worked out again at the next
deploy (MAX_REPLICAS may have changed), where a user's own value is kept."""


def _share_the_gpus() -> None:
    global _chosen_share
    if os.environ.get("NUM_GPUS_PER_REPLICA", _chosen_share) != _chosen_share:
        return  # the user's
    gpus = _cluster_gpus()
    if gpus > 0:
        share = gpus_per_replica(gpus, ServeConfig.from_env().max_replicas)
        _chosen_share = os.environ["NUM_GPUS_PER_REPLICA"] = f"{share:g}"


def _cluster_gpus() -> float:
    """GPUs Ray found in the cluster (asked of Ray rather than torch, which a
    notebook kernel never imports)."""
    import ray

    return ray.cluster_resources().get("GPU", 0)


def is_deployed() -> bool:
    from ray import serve

    connect()
    return APP_NAME in serve.status().applications


def ensure_deployed() -> None:
    """Deploy unless the app already runs. Its settings are then the deploying
    kernel's, which this one cannot see: ask the server (``/healthz``)."""
    if not is_deployed():
        deploy()


def app_status() -> dict[str, Any]:
    """The app's status and each deployment's replicas by state."""
    from ray import serve

    connect()
    application = serve.status().applications[APP_NAME]
    return {
        "status": state_name(application.status),
        "deployments": {
            name: {state_name(state): n for state, n in d.replica_states.items()}
            for name, d in application.deployments.items()
        },
    }
