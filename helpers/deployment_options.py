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


HEALTH_CHECK_PERIOD_S = 5.0
"""How often Serve calls ``LLMServer.check_health`` (a one-token forward pass)."""

HEALTH_CHECK_TIMEOUT_S = 30.0
"""A probe that waits this long for a CPU busy decoding a full batch is still fine."""

CONSTRUCTOR_RETRIES = 2
"""Attempts to start a replica before Serve marks the deployment failed. A model
that cannot load fails the same way every time; Ray's default of 20 attempts
would keep a deploy (and any request waiting on it) retrying for minutes."""


def model_deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Options for the LLMServer deployment: resources, autoscaling, limits, health.

    Past ``max_ongoing_requests`` per replica, requests queue in the ingress's
    handle; past ``max_queued_requests`` there, Serve refuses them at once and
    the ingress answers 503. A stopping replica (scale-down, redeploy) waits up
    to ``REQUEST_TIMEOUT_S`` for the requests it holds, so none is cut short.
    """
    return {
        "autoscaling_config": autoscaling_config(config),
        "max_ongoing_requests": config.ongoing_limit,
        "max_queued_requests": config.max_queued_requests,
        "graceful_shutdown_timeout_s": config.request_timeout_s,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "ray_actor_options": {
            "num_cpus": config.num_cpus_per_replica,
            "num_gpus": config.num_gpus_per_replica,
            "resources": dict(config.resources_per_replica),
            "runtime_env": _metric_push_env(),
        },
    }


def ingress_options(config: ServeConfig) -> dict[str, Any]:
    """Options for the Ingress deployment: one tiny replica that never scales.

    Zero logical CPUs: the ingress is light, and a fractional claim would keep
    the last model replica from fitting on a small machine. Like the model
    replicas, a stopping ingress waits out the requests (streams) it holds.
    """
    return {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0, "runtime_env": _metric_push_env()},
        "max_ongoing_requests": 1000,
        "graceful_shutdown_timeout_s": config.request_timeout_s,
    }
