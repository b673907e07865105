"""Assemble the Serve application: the ingress bound to the model deployment.

client -> Serve HTTP proxy -> Ingress (FastAPI, 1 tiny replica)
                                -> LLMServer (0..MAX_REPLICAS) -> Engine
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from helpers.config import ServeConfig
from helpers.serve.deployment_options import ingress_options, model_deployment_options
from helpers.serve.ingress import Ingress
from helpers.serve.model_calls import MODEL_DEPLOYMENT
from helpers.serve.model_server import LLMServer


def build_app(config: ServeConfig, model_server: type = LLMServer) -> Application:
    """Bind both deployments with the parsed configuration.

    ``model_server`` lets the benchmark put its walkthrough-style baseline
    behind the very same ingress and replica settings.
    """
    model = serve.deployment(
        model_server, name=MODEL_DEPLOYMENT, **model_deployment_options(config)
    )
    ingress = serve.deployment(Ingress, name="Ingress", **ingress_options(config))
    return ingress.bind(model.bind(config), config)
