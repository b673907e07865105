"""Translate :class:`ServeConfig` into Ray Serve deployment options.

This is where ``RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S`` becomes real: it is not
a Ray setting, and the walkthrough's app passed it through a key that Ray
silently ignores. Ray Serve 2.60 judges load on ongoing requests averaged over
``look_back_period_s``; once that average says a replica is not needed, it
waits ``downscale_delay_s`` (N -> N-1) or ``downscale_to_zero_delay_s``
(1 -> 0) before stopping it. A finished request stays in the average for one
look-back window, so a replica idles for about window + delay: the window is
half the idle timeout (within bounds) and the delays are the rest.

Load reaches the controller every ``metrics_interval_s``, 10 s by default. In
Ray Serve 2.60 that field, although marked deprecated in favour of two
environment variables, is still what handles and replicas read (``router.py``
and ``replica.py``); the variables are defined but unused. It sets the cold
start's first wait: at zero replicas a queued request triggers an immediate
push, but that push carries the points the handle recorded every interval,
which do not include the request yet, so Serve scales up from zero only on
the first push after the next recorded point (decision record 0026).
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import RequestRouterConfig

from helpers.config import ServeConfig
from helpers.serve import spare_worker
from helpers.serve.prefix_routing import PrefixAffinityRouter

INGRESS_ONGOING_REQUESTS = 1000
"""The fewest requests the ingress takes at once; each costs it little."""

INGRESS_ROOM = 100
"""What the ingress takes beyond what the model deployment can hold:
``/healthz`` probes, and refusals on their way out."""

INGRESS_QUEUED_REQUESTS = 100
"""Requests the proxy keeps waiting for a full ingress before it answers 503
with Retry-After; Serve's default keeps them waiting without end."""

INGRESS_SHUTDOWN_MARGIN_S = 10.0
"""How much longer than its requests may take a stopping ingress waits for
them, so each ends with its own answer rather than a cut connection."""

MAX_LOOK_BACK_PERIOD_S = 12.0
"""The longest window over which Ray averages ongoing requests (Ray's default
is 30 s, which adds up to 30 s to every scale-down)."""

MIN_LOOK_BACK_PERIOD_S = 1.0
"""The shortest: several load reports long, and Ray requires it to be longer
than ``metrics_interval_s``."""

MIN_DOWNSCALE_DELAY_S = 1.0

METRICS_INTERVAL_S = 0.25
"""How often handles and replicas record and report load to the controller
(Ray: 10 s). Short, because a scale-up from zero waits for it."""

UPSCALE_DELAY_S = 5.0
"""How long load must stay high before adding a replica (Ray's default is 30 s).
The cold start from zero skips this delay entirely."""


JSON_LOGS = {"encoding": "JSON"}
"""Serve's structured logs: each line a JSON object that carries the
``request_id`` of the request it is about (the id the response's
``x-request-id`` header and error bodies show), in the replica's log file."""


def look_back_period_s(config: ServeConfig) -> float:
    """Half the idle timeout, within bounds: a window shorter than the timeout,
    so a short timeout (the notebooks' 5 s) is honoured rather than stretched
    by the window, and long enough to smooth the load the autoscaler adds
    replicas for."""
    half = config.idle_timeout_s / 2
    return min(MAX_LOOK_BACK_PERIOD_S, max(half, MIN_LOOK_BACK_PERIOD_S))


def autoscaling_config(config: ServeConfig) -> dict[str, Any]:
    look_back = look_back_period_s(config)
    delay = max(config.idle_timeout_s - look_back, MIN_DOWNSCALE_DELAY_S)
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "downscale_delay_s": delay,
        "downscale_to_zero_delay_s": delay,
        "upscale_delay_s": UPSCALE_DELAY_S,
        "look_back_period_s": look_back,
        "metrics_interval_s": METRICS_INTERVAL_S,
    }


HEALTH_CHECK_PERIOD_S = 5.0
"""How often Serve calls ``LLMServer.check_health`` (``Engine.probe``: the
decode loop alive and moving, and a one-token forward pass)."""

HEALTH_CHECK_TIMEOUT_S = 30.0
"""A probe that waits this long for a CPU busy decoding a full batch is still fine."""

CONSTRUCTOR_RETRIES = 2
"""Attempts to start a replica before Serve marks the deployment failed. A model
that cannot load fails the same way every time; Ray's default of 20 attempts
would keep a deploy (and any request waiting on it) retrying for minutes."""


def model_deployment_options(config: ServeConfig, spare_key: str | None = None) -> dict[str, Any]:
    """Options for the LLMServer deployment: resources, autoscaling, limits, health.

    Past ``max_ongoing_requests`` per replica, requests queue in the ingress's
    handle; past ``max_queued_requests`` there, Serve refuses them at once and
    the ingress answers 503. A stopping replica (scale-down, redeploy) waits up
    to ``REQUEST_TIMEOUT_S`` for the requests it holds, so none is cut short.
    With a ``spare_key`` (``SPARE_WORKER=on``), the replicas' runtime env
    prepares and matches spare processes (:mod:`helpers.serve.spare_worker`).
    Replicas that keep a prefix cache get requests by what their prompts
    start with (:func:`request_router`).
    """
    actor_options: dict[str, Any] = {
        "num_cpus": config.num_cpus_per_replica,
        "num_gpus": config.num_gpus_per_replica,
        "resources": dict(config.resources_per_replica),
    }
    if spare_key:
        actor_options["runtime_env"] = spare_worker.runtime_env(spare_key, config)
    return {
        "autoscaling_config": autoscaling_config(config),
        "max_ongoing_requests": config.ongoing_limit,
        "max_queued_requests": config.max_queued_requests,
        "graceful_shutdown_timeout_s": config.request_timeout_s,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "logging_config": JSON_LOGS,
        "ray_actor_options": actor_options,
        "request_router_config": request_router(config),
    }


def request_router(config: ServeConfig) -> RequestRouterConfig:
    """Prefix affinity (:mod:`helpers.serve.prefix_routing`, ``PREFIX_ROUTING``)
    where the replicas keep what ended sequences computed: ``PREFIX_CACHE_MB``
    above 0, on CPUs and GPUs alike. Elsewhere nothing is kept to find again,
    and Serve's default, the less busy of two replicas, is the better rule."""
    if config.prefix_routing == "on" and config.prefix_cache_mb > 0:
        return RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    return RequestRouterConfig()


def ingress_options(config: ServeConfig) -> dict[str, Any]:
    """Options for the Ingress deployment: one tiny replica that never scales.

    Zero logical CPUs: the ingress is light, and a fractional claim would keep
    the last model replica from fitting on a small machine. It holds every
    request the model deployment can (``MAX_REPLICAS`` full replicas and a
    full queue) and room for probes besides, so the model's own limits, with
    their 503, are what a client meets. A burst past even that waits in the
    proxy's bounded queue, then gets the proxy's 503, never an endless wait.
    Like the model replicas, a stopping ingress waits out the requests
    (streams) it holds: a body's upload and then the model call may each
    take ``REQUEST_TIMEOUT_S``.
    """
    model_holds = config.max_replicas * config.ongoing_limit + max(config.max_queued_requests, 0)
    return {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": max(INGRESS_ONGOING_REQUESTS, model_holds + INGRESS_ROOM),
        "max_queued_requests": INGRESS_QUEUED_REQUESTS,
        "graceful_shutdown_timeout_s": 2 * config.request_timeout_s + INGRESS_SHUTDOWN_MARGIN_S,
        "logging_config": JSON_LOGS,
    }
