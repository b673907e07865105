"""What every benchmark starts from: its own local Ray cluster on loopback, and
the configuration from the environment with the model replicas held at
``MAX_REPLICAS``, so autoscaling does not blur the figures."""

import os

import ray

from helpers.config import ServeConfig


def pinned_config() -> ServeConfig:
    replicas = os.environ.get("MAX_REPLICAS", "2")
    return ServeConfig.from_env({**os.environ, "MIN_REPLICAS": replicas, "MAX_REPLICAS": replicas})


def start_ray() -> None:
    """A new cluster that ends with this process, never one already running."""
    ray.init(address="local", _node_ip_address="127.0.0.1", namespace="serve")
