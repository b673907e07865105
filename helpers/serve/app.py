"""Assemble the Serve application: the ingress bound to the model deployment.

client -> Serve HTTP proxy -> Ingress (FastAPI, 1 tiny replica)
                                -> LLMServer (0..MAX_REPLICAS) -> Engine

Before binding, :func:`fetch_hub_model` downloads a hub ``MODEL_ID`` on the
machine that builds the app (the terminal of ``serve run``, or the notebook),
so the download shows its progress bar there and ends before any request's
deadline starts counting. ``helpers.engine.hub`` imports neither torch nor
transformers, so the driver stays light.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray import serve
from ray.serve import Application

from helpers.config import ServeConfig
from helpers.engine.errors import ModelLoadError
from helpers.engine.hub import is_hub_id, snapshot_directory
from helpers.serve import spare_worker
from helpers.serve.deployment_options import ingress_options, model_deployment_options
from helpers.serve.ingress import Ingress
from helpers.serve.model_calls import MODEL_DEPLOYMENT
from helpers.serve.model_server import LLMServer


def build_app(config: ServeConfig, model_server: type = LLMServer) -> Application:
    """Bind both deployments with the parsed configuration.

    A hub ``MODEL_ID`` is downloaded first (:func:`fetch_hub_model`).
    ``model_server`` lets the benchmark put its walkthrough-style baseline
    behind the very same ingress and replica settings. The spare process's key
    is taken here, once, so every node agrees on it.
    """
    fetch_hub_model(config.model_id)
    spare_key = spare_worker.spare_key(config) if config.spare_worker == "on" else None
    model = serve.deployment(
        model_server, name=MODEL_DEPLOYMENT, **model_deployment_options(config, spare_key)
    )
    ingress = serve.deployment(Ingress, name="Ingress", **ingress_options(config))
    return ingress.bind(model.bind(config), config, spare_key)


def fetch_hub_model(model_id: str) -> Path | None:
    """Download a hub ``MODEL_ID`` into the Hugging Face cache, once, at deploy time.

    Returns its snapshot directory, or None for the embedded model, a local
    directory or a ``.gguf`` file (nothing to download). A cached model is
    found without a network call.

    A failure prints one line and deploys anyway; it does not stop the deploy.
    The model replica is the authority on what it can load: on a cluster it
    may run on another machine, with its own cache, network and ``HF_TOKEN``;
    the deploy then fails there, after bounded retries, with the same
    ``ModelLoadError: MODEL_ID=... cannot be loaded: <reason>`` in Serve's
    status, and a request to a model deployed at zero replicas gets a 503
    naming it rather than a hang. Raising here would instead turn every such
    case into a traceback from ``serve run``'s import of the app.
    """
    if not is_hub_id(model_id):
        return None
    try:
        directory = snapshot_directory(model_id)
    except ModelLoadError as err:
        print(f"Warning: {err} (each model replica will try again)", file=sys.stderr, flush=True)
        return None
    print(f"MODEL_ID={model_id!r}: model files in {directory}", file=sys.stderr, flush=True)
    return directory
