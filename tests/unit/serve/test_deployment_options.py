"""Unit tests for helpers.serve.deployment_options: ServeConfig -> Ray Serve options."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from helpers.config import ServeConfig
from helpers.serve.deployment_options import (
    MIN_DOWNSCALE_DELAY_S,
    MIN_LOOK_BACK_PERIOD_S,
    autoscaling_config,
    ingress_options,
    model_deployment_options,
)


def idle_span(options: dict) -> float:
    """How long a replica idles before Ray stops it: one look-back window, in
    which the last request still counts, then the downscale delay."""
    return options["look_back_period_s"] + options["downscale_to_zero_delay_s"]


CUSTOM_ENV = {
    "MIN_REPLICAS": "1",
    "MAX_REPLICAS": "5",
    "TARGET_ONGOING_REQUESTS": "2.5",
    "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "300",
    "NUM_CPUS_PER_REPLICA": "3",
    "NUM_GPUS_PER_REPLICA": "1",
    "MAX_BATCH_SIZE": "8",
    "RESOURCES_PER_REPLICA": '{"llm_node": 1}',
}

CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param(CUSTOM_ENV, id="custom"),
    pytest.param(
        {"MIN_REPLICAS": "0", "MAX_REPLICAS": "1", "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "15"},
        id="short-idle-scale-to-zero",
    ),
    pytest.param({"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "4"}, id="the-tests-idle-timeout"),
    pytest.param({"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "1"}, id="shortest-idle-timeout"),
]


@pytest.mark.parametrize("environ", CONFIGS)
def test_idle_replicas_stop_after_the_idle_timeout_not_before(
    environ: dict[str, str],
) -> None:
    config = ServeConfig.from_env(environ)
    options = autoscaling_config(config)
    assert options["downscale_delay_s"] == options["downscale_to_zero_delay_s"]
    assert idle_span(options) >= config.idle_timeout_s
    assert (
        idle_span(options)
        <= max(config.idle_timeout_s, MIN_LOOK_BACK_PERIOD_S) + MIN_DOWNSCALE_DELAY_S
    )


@pytest.mark.parametrize("environ", CONFIGS)
def test_autoscaling_config_takes_replica_bounds_and_target_from_config(
    environ: dict[str, str],
) -> None:
    config = ServeConfig.from_env(environ)
    options = autoscaling_config(config)
    assert options["min_replicas"] == config.min_replicas
    assert options["max_replicas"] == config.max_replicas
    assert options["target_ongoing_requests"] == config.target_ongoing_requests


def test_autoscaling_config_values_follow_the_environment() -> None:
    options = autoscaling_config(ServeConfig.from_env(CUSTOM_ENV))
    assert options["min_replicas"] == 1
    assert options["max_replicas"] == 5
    assert options["target_ongoing_requests"] == 2.5
    assert idle_span(options) == 300.0


@pytest.mark.parametrize("environ", CONFIGS)
def test_autoscaling_config_uses_only_current_ray_keys(environ: dict[str, str]) -> None:
    options = autoscaling_config(ServeConfig.from_env(environ))
    assert "target_num_ongoing_requests_per_replica" not in options
    # Ray accepts (and drops) unknown or deprecated keys silently, so check each
    # key against the fields of Ray's own model.
    assert set(options) <= set(AutoscalingConfig.model_fields)


@pytest.mark.parametrize("environ", CONFIGS)
def test_ray_autoscaling_config_validates_and_keeps_values(environ: dict[str, str]) -> None:
    config = ServeConfig.from_env(environ)
    options = autoscaling_config(config)
    ray_config = AutoscalingConfig(**options)
    for key, value in options.items():
        assert getattr(ray_config, key) == value, key
    assert ray_config.min_replicas == config.min_replicas
    assert ray_config.max_replicas == config.max_replicas
    assert ray_config.target_ongoing_requests == config.target_ongoing_requests
    assert ray_config.look_back_period_s > ray_config.metrics_interval_s


@pytest.mark.parametrize("batch_size", ["1", "16", "256"])
def test_max_ongoing_requests_exceeds_batch_size_by_default(batch_size: str) -> None:
    config = ServeConfig.from_env({"MAX_BATCH_SIZE": batch_size})
    options = model_deployment_options(config)
    assert options["max_ongoing_requests"] > config.max_batch_size
    assert isinstance(options["max_ongoing_requests"], int)


def test_limits_and_timeouts_come_from_the_config() -> None:
    config = ServeConfig.from_env(
        {"MAX_ONGOING_REQUESTS": "3", "MAX_QUEUED_REQUESTS": "7", "REQUEST_TIMEOUT_S": "42"}
    )
    options = model_deployment_options(config)
    assert options["max_ongoing_requests"] == 3
    assert options["max_queued_requests"] == 7
    assert options["graceful_shutdown_timeout_s"] == 42.0


@pytest.mark.parametrize("environ", CONFIGS)
def test_ray_accepts_every_model_deployment_option(environ: dict[str, str]) -> None:
    from ray import serve

    class Probe:
        pass

    options = model_deployment_options(ServeConfig.from_env(environ))
    deployment = serve.deployment(Probe, **options)
    assert deployment.max_ongoing_requests == options["max_ongoing_requests"]
    assert deployment.max_queued_requests == options["max_queued_requests"]


@pytest.mark.parametrize("environ", CONFIGS)
def test_model_deployment_options_resources_come_from_config(environ: dict[str, str]) -> None:
    config = ServeConfig.from_env(environ)
    options = model_deployment_options(config)
    assert options["ray_actor_options"]["num_cpus"] == config.num_cpus_per_replica
    assert options["ray_actor_options"]["num_gpus"] == config.num_gpus_per_replica
    assert options["autoscaling_config"] == autoscaling_config(config)


def test_model_deployment_options_resources_follow_the_environment() -> None:
    options = model_deployment_options(ServeConfig.from_env(CUSTOM_ENV))
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (3.0, 1.0)
    assert actor["resources"] == {"llm_node": 1.0}
    assert options["max_ongoing_requests"] > 8


@pytest.mark.parametrize("environ", CONFIGS)
def test_load_reaches_the_controller_within_a_quarter_second_and_each_window_holds_several_reports(
    environ: dict[str, str],
) -> None:
    # Ray 2.60's handles record and push at this interval (10 s by default),
    # and a scale-up from zero waits for the first push after the next record.
    ray_config = AutoscalingConfig(**autoscaling_config(ServeConfig.from_env(environ)))
    assert ray_config.metrics_interval_s <= 0.25
    assert ray_config.look_back_period_s >= 4 * ray_config.metrics_interval_s


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"MAX_REPLICAS": "100", "MAX_ONGOING_REQUESTS": "64", "MAX_QUEUED_REQUESTS": "500"},
        {"MAX_QUEUED_REQUESTS": "-1"},
    ],
)
def test_the_ingress_holds_all_the_model_can_and_a_burst_past_it_is_refused(
    environ: dict[str, str],
) -> None:
    config = ServeConfig.from_env(environ)
    options = ingress_options(config)
    model_holds = config.max_replicas * config.ongoing_limit + max(config.max_queued_requests, 0)
    assert options["max_ongoing_requests"] > model_holds
    assert options["max_queued_requests"] > 0, "a full ingress would keep requests without end"
    # An upload and then a model call may each take REQUEST_TIMEOUT_S.
    assert options["graceful_shutdown_timeout_s"] > 2 * config.request_timeout_s


PREFIX_ROUTER = "helpers.serve.prefix_routing.PrefixAffinityRouter"
"""Where Serve imports the router from, in the ingress's process."""


@pytest.mark.parametrize(
    ("environ", "by_prefix"),
    [
        ({}, True),
        ({"PREFIX_CACHE_MB": "0"}, False),
        ({"PREFIX_ROUTING": "off"}, False),
        ({"NUM_GPUS_PER_REPLICA": "0.5"}, True),
        ({"NUM_GPUS_PER_REPLICA": "1", "PREFIX_CACHE_MB": "0"}, False),
    ],
)
def test_replicas_that_keep_a_prefix_cache_get_requests_by_prefix(
    environ: dict[str, str], by_prefix: bool
) -> None:
    router = model_deployment_options(ServeConfig.from_env(environ))["request_router_config"]
    assert (router.request_router_class == PREFIX_ROUTER) is by_prefix
