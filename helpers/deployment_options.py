"""Translate :class:`ServeConfig` into Ray Serve deployment options.

This is where ``RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S`` becomes real: it is not
a Ray setting, and the walkthrough's app passed it through a key that Ray
silently ignores. Ray Serve 2.60 judges load on ongoing requests averaged over
``look_back_period_s``; once that average says a replica is not needed, it
waits ``downscale_delay_s`` (N -> N-1) or ``downscale_to_zero_delay_s``
(1 -> 0) before stopping it. A finished request stays in the average for one
look-back window, so a replica idles for about window + delay: the delays are
the idle timeout less the window, and metrics are pushed every second rather
than every ten, so the controller's view is never ten seconds stale.
"""

from __future__ import annotations

from typing import Any

from helpers.config import ServeConfig

LOOK_BACK_PERIOD_S = 12.0
"""Window over which Ray averages ongoing requests. Short, so the last request
stops counting soon after it ends (Ray's default of 30 s adds up to 30 s to
every scale-down), yet longer than the 10 s interval at which replicas report
their metrics, which Ray requires."""

MIN_DOWNSCALE_DELAY_S = 1.0

METRIC_PUSH_INTERVAL_S = 1.0
"""How often handles and replicas report load to the controller (Ray: 10 s)."""

UPSCALE_DELAY_S = 5.0
"""How long load must stay high before adding a replica (Ray's default is 30 s).
The cold start from zero skips this delay entirely."""


def autoscaling_config(config: ServeConfig) -> dict[str, Any]:
    delay = max(config.idle_timeout_s - LOOK_BACK_PERIOD_S, MIN_DOWNSCALE_DELAY_S)
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "downscale_delay_s": delay,
        "downscale_to_zero_delay_s": delay,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
    }


def _metric_push_env() -> dict[str, Any]:
    """Ray reads these when a replica process starts, hence a runtime env."""
    interval = str(METRIC_PUSH_INTERVAL_S)
    return {
        "env_vars": {
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": interval,
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": interval,
        }
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
            "runtime_env": _metric_push_env(),
        },
    }


INGRESS_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,
    # Zero logical CPUs: the ingress is light, and a fractional claim would
    # keep the last model replica from fitting on a small machine.
    "ray_actor_options": {"num_cpus": 0, "runtime_env": _metric_push_env()},
    "max_ongoing_requests": 1000,
}
