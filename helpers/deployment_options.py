"""Translate :class:`ServeConfig` into Ray Serve deployment options.

This is where ``RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S`` becomes real: it is not
a Ray setting, and the walkthrough's app passed it through a key that Ray
silently ignores. Ray Serve 2.60 stops an idle replica after
``downscale_delay_s`` (for N -> N-1) and ``downscale_to_zero_delay_s`` (for
1 -> 0), judged on request counts averaged over ``look_back_period_s``; all
three are set from the one idle timeout here.
"""

from __future__ import annotations

from typing import Any

from helpers.config import ServeConfig

LOOK_BACK_PERIOD_S = 12.0
"""Window over which Ray averages ongoing requests. Short, so the last request
stops counting soon after it ends (Ray's default of 30 s adds up to 30 s to
every scale-down), yet longer than the 10 s interval at which replicas report
their metrics, which Ray requires."""

UPSCALE_DELAY_S = 5.0
"""How long load must stay high before adding a replica (Ray's default is 30 s).
The cold start from zero skips this delay entirely."""


def autoscaling_config(config: ServeConfig) -> dict[str, Any]:
    idle = config.idle_timeout_s
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "downscale_delay_s": idle,
        "downscale_to_zero_delay_s": idle,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
    }


def model_deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Options for the LLMServer deployment: resources, autoscaling, concurrency.

    ``max_ongoing_requests`` must exceed the batch size, or Serve would never
    hand one replica enough requests to fill a batch (its default is 5).
    """
    return {
        "autoscaling_config": autoscaling_config(config),
        "max_ongoing_requests": 2 * config.max_batch_size,
        "ray_actor_options": {
            "num_cpus": config.num_cpus_per_replica,
            "num_gpus": config.num_gpus_per_replica,
        },
    }


INGRESS_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    # Zero logical CPUs: the ingress is light, and a fractional claim would
    # keep the last model replica from fitting on a small machine.
    "ray_actor_options": {"num_cpus": 0},
    "max_ongoing_requests": 1000,
}
