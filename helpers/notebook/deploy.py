"""Deploy, inspect and delete the app from Python, as the notebooks do.

:func:`deploy` is the Python twin of ``serve run ray_serve_app:deployment_graph``:
it reads the configuration the same way (from the environment, plus any
overrides), builds the same application and names it ``RayServeLLM``.
:func:`delete_app` runs the walkthrough's ``serve delete RayServeLLM``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from helpers.config import APP_NAME, ServeConfig
from helpers.notebook.cluster import connect, serve_command
from helpers.notebook.config_table import gpus_per_replica
from helpers.serve.app import build_app
from helpers.serve.model_calls import state_name
from helpers.serve.model_server import LLMServer


def deploy(overrides: Mapping[str, str] | None = None) -> ServeConfig:
    """Deploy (or redeploy) the app and wait until Serve reports it RUNNING.

    ``overrides`` are environment variables (``{"MAX_REPLICAS": "2"}``). They
    are checked with the rest of the environment first, before Ray is asked
    for anything, and written into this process's environment (so later cells
    see them) only once the whole configuration is valid: a refused value
    left there would fail every later deploy in the kernel, after the cell
    that set it no longer shows it.
    On a cluster with GPUs (Colab's GPU runtime), replicas ask for a share of
    one that lets ``MAX_REPLICAS`` of them run at once (``gpus_per_replica``
    in :mod:`helpers.notebook.config_table`), unless ``NUM_GPUS_PER_REPLICA``
    says otherwise.
    """

    overrides = dict(overrides or {})
    if not_text := [name for name, value in overrides.items() if not isinstance(value, str)]:
        raise TypeError(f"Overrides are environment variables, so text: quote {not_text}")
    ServeConfig.from_env({**os.environ, **overrides})  # raises ConfigError
    connect()
    os.environ.update(overrides)
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


UNUSABLE_STATES = frozenset({"DEPLOY_FAILED", "DELETING"})
"""App states :func:`ensure_deployed` deploys over rather than reuses."""


def app_state() -> str | None:
    """The app's status as Serve names it (``RUNNING``, ``DEPLOY_FAILED``...),
    or None when no app of that name is deployed."""
    from ray import serve

    connect()
    application = serve.status().applications.get(APP_NAME)
    return None if application is None else state_name(application.status)


def is_deployed() -> bool:
    """Whether Serve holds the app, in any state."""
    return app_state() is not None


def ensure_deployed() -> None:
    """Deploy unless the app is already up or on its way up (deploying, or
    unhealthy while Serve restarts a replica). Its settings are then the
    deploying kernel's, which this one cannot see: ask the server
    (``/healthz``).

    A failed app (``DEPLOY_FAILED``) or one being deleted (``DELETING``)
    never answers, and reusing it left the next cells waiting minutes for
    it. Such an app is deployed again from this kernel rather than refused:
    Serve lets ``serve.run`` replace either one, so the redeploy either
    brings the app up (the failure has passed, or the environment has been
    fixed since) or fails at once with the deployments' reasons, which says
    more than an error raised here could.
    """
    if app_state() in {None, *UNUSABLE_STATES}:
        deploy()


NOT_RUNNING = "is not running on this cluster"
"""What ``serve delete`` (:mod:`helpers.serve.cli`) says when there is no app
of that name to delete."""


def delete_app() -> str:
    """The walkthrough's ``serve delete RayServeLLM``: prints the command, runs
    it and returns what it said.

    Run again, the command finds no app and exits 1; the app is gone either
    way, so that counts as deleted rather than failing a re-run cell. Any
    other failure raises with the command's own message.
    """
    args = ("delete", APP_NAME)
    print("$ serve", *args)
    result = serve_command(*args)
    said = (result.stdout or result.stderr).strip()
    if result.returncode != 0 and NOT_RUNNING not in result.stderr:
        raise RuntimeError(f"serve delete failed (exit {result.returncode}):\n{said}")
    return said


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
