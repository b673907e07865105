"""Unit tests for helpers.config: parsing and validating the environment."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from helpers.config import EMBEDDED_MODEL_ID, VARIABLES, ConfigError, ServeConfig

VARIABLES_BY_NAME = {var.name: var for var in VARIABLES}

# The walkthrough's table of variables and their defaults.
WALKTHROUGH_DEFAULTS = {
    "model_id": EMBEDDED_MODEL_ID,
    "max_new_tokens": 256,
    "temperature": 0.7,
    "top_p": 0.9,
    "num_gpus_per_replica": 0.0,
    "num_cpus_per_replica": 1.0,
    "min_replicas": 0,
    "max_replicas": 2,
    "target_ongoing_requests": 1.0,
    "idle_timeout_s": 60.0,
}

# Values each variable must refuse: non-numbers, just below and above its range,
# non-finite numbers, and fractions where an integer is expected.
BAD_VALUES: dict[str, list[str]] = {
    "MODEL_ID": ["", "   "],
    "MAX_NEW_TOKENS": ["many", "", "0", "4097", "1.5", "nan", "inf"],
    "TEMPERATURE": ["warm", "", "-0.1", "2.1", "nan", "inf", "-inf"],
    "TOP_P": ["high", "0", "-0.1", "1.01", "nan", "inf"],
    "NUM_GPUS_PER_REPLICA": ["one", "-1", "8.5", "nan", "inf", "0.00001"],
    "NUM_CPUS_PER_REPLICA": ["two", "0", "0.05", "257", "nan", "inf"],
    "LLM_METRICS": ["", "yes", "true"],
    "SPARE_WORKER": ["", "1", "spare"],
    "PREFIX_ROUTING": ["", "yes", "affinity"],
    "RESOURCES_PER_REPLICA": [
        "llm_node",
        "[1]",
        '{"llm_node": 0}',
        '{"llm_node": -1}',
        '{"llm_node": "1"}',
        '{"llm_node": true}',
        '{"llm_node": 10001}',
        '{"llm_node": 0.00001}',
        '{"CPU": 1}',
        '{"GPU": 1}',
        '{"": 1}',
    ],
    "MIN_REPLICAS": ["none", "-1", "101", "0.5", "nan", "inf"],
    "MAX_REPLICAS": ["two", "0", "101", "1.5", "nan", "inf"],
    "TARGET_ONGOING_REQUESTS": ["lots", "0", "0.05", "1001", "nan", "inf"],
    "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": ["soon", "0", "0.5", "86401", "nan", "inf"],
    "MAX_BATCH_SIZE": ["big", "0", "257", "2.5", "nan", "inf"],
    "PREFILL_CHUNK_TOKENS": ["lots", "0", "15", "8193", "64.5", "nan", "inf"],
    "PREFIX_CACHE_MB": ["lots", "-1", "65537", "0.5", "nan", "inf", "auto"],
    "MAX_PROMPTS": ["few", "0", "257", "3.5", "nan", "inf"],
    "PROMPT_FORMAT": ["", "json", "chatml"],
    "DTYPE": ["", "fp17", "half", "float64", "int8"],
    "CPU_WEIGHTS": ["", "q4_0", "int8", "fp16"],
    "MODEL_CACHE_DIR": ["", "   ", "~no_such_user_here/models"],
    "API_KEY": [
        "   ",
        "\t",
        "short",
        "x" * 15,
        "sixteen chars with spaces",
        "\u00e9" * 20,
        "k" * 513,
    ],
    "MAX_BODY_BYTES": ["big", "1023", "67108865", "1.5", "nan"],
    "MAX_ONGOING_REQUESTS": ["many", "0", "10001", "2.5", "nan", ""],
    "GPU_MEMORY_FRACTION": ["most", "0", "0.04", "1.5", "nan", ""],
    "MAX_QUEUED_REQUESTS": ["lots", "0", "-2", "100001", "1.5", "nan"],
    "REQUEST_TIMEOUT_S": ["soon", "0", "0.5", "86401", "nan", "inf"],
}

BAD_CASES = [
    pytest.param(name, raw, id=f"{name}={raw!r}")
    for name, raws in BAD_VALUES.items()
    for raw in raws
]


def test_embedded_model_id_is_not_a_hub_id() -> None:
    assert EMBEDDED_MODEL_ID
    assert "/" not in EMBEDDED_MODEL_ID


def test_every_variable_has_bad_value_cases() -> None:
    assert set(BAD_VALUES) == set(VARIABLES_BY_NAME)


def test_variables_map_one_to_one_onto_config_fields() -> None:
    assert sorted(var.field for var in VARIABLES) == sorted(f.name for f in fields(ServeConfig))
    assert len(VARIABLES_BY_NAME) == len(VARIABLES)


def test_defaults_match_walkthrough_table() -> None:
    config = ServeConfig.from_env({})
    for field, expected in WALKTHROUGH_DEFAULTS.items():
        actual = getattr(config, field)
        assert actual == expected, field
        assert type(actual) is type(expected), field


def test_default_model_id_variable_is_embedded_model() -> None:
    assert VARIABLES_BY_NAME["MODEL_ID"].default == EMBEDDED_MODEL_ID


def test_other_defaults() -> None:
    config = ServeConfig.from_env({})
    assert config.max_batch_size == 16
    assert config.max_prompts == 16
    assert config.prompt_format == "auto"


def test_default_cache_dir_is_resolved_under_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = ServeConfig.from_env({})
    assert config.model_cache_dir == tmp_path.resolve() / ".cache" / "ray-serve-llm"


def test_from_env_ignores_process_environment_when_mapping_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_REPLICAS", "7")
    assert ServeConfig.from_env({}).max_replicas == 2


def test_from_env_reads_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_REPLICAS", "7")
    monkeypatch.setenv("TEMPERATURE", "0.25")
    config = ServeConfig.from_env()
    assert config.max_replicas == 7
    assert config.temperature == 0.25


OVERRIDES = [
    ("MODEL_ID", "HuggingFaceTB/SmolLM2-360M", "model_id", "HuggingFaceTB/SmolLM2-360M"),
    ("MODEL_ID", "  /models/tiny.gguf  ", "model_id", "/models/tiny.gguf"),
    ("MAX_NEW_TOKENS", "4096", "max_new_tokens", 4096),
    ("MAX_NEW_TOKENS", " 12 ", "max_new_tokens", 12),
    ("TEMPERATURE", "0", "temperature", 0.0),
    ("TEMPERATURE", "2", "temperature", 2.0),
    ("TOP_P", "1", "top_p", 1.0),
    ("TOP_P", "0.05", "top_p", 0.05),
    ("TOP_P", "5e-7", "top_p", 5e-7),
    ("NUM_GPUS_PER_REPLICA", "1", "num_gpus_per_replica", 1.0),
    ("NUM_GPUS_PER_REPLICA", "0.5", "num_gpus_per_replica", 0.5),
    ("NUM_CPUS_PER_REPLICA", "4", "num_cpus_per_replica", 4.0),
    ("NUM_CPUS_PER_REPLICA", "0.1", "num_cpus_per_replica", 0.1),
    ("RESOURCES_PER_REPLICA", "", "resources_per_replica", {}),
    ("LLM_METRICS", "OFF", "llm_metrics", "off"),
    ("SPARE_WORKER", "Off", "spare_worker", "off"),
    ("PREFIX_ROUTING", "OFF", "prefix_routing", "off"),
    ("RESOURCES_PER_REPLICA", '{"llm_node": 1}', "resources_per_replica", {"llm_node": 1.0}),
    ("RESOURCES_PER_REPLICA", '{"b": 0.5, "a": 2}', "resources_per_replica", {"a": 2.0, "b": 0.5}),
    ("MIN_REPLICAS", "1", "min_replicas", 1),
    ("MAX_REPLICAS", "100", "max_replicas", 100),
    ("TARGET_ONGOING_REQUESTS", "8", "target_ongoing_requests", 8.0),
    ("RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S", "1", "idle_timeout_s", 1.0),
    ("RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S", "2.5", "idle_timeout_s", 2.5),
    ("MAX_BATCH_SIZE", "256", "max_batch_size", 256),
    ("PREFILL_CHUNK_TOKENS", "16", "prefill_chunk_tokens", 16),
    ("PREFILL_CHUNK_TOKENS", "8192", "prefill_chunk_tokens", 8192),
    ("PREFILL_CHUNK_TOKENS", " Auto ", "prefill_chunk_tokens", None),
    ("PREFIX_CACHE_MB", "0", "prefix_cache_mb", 0),
    ("PREFIX_CACHE_MB", "65536", "prefix_cache_mb", 65536),
    ("MAX_PROMPTS", "1", "max_prompts", 1),
    ("PROMPT_FORMAT", "CHAT", "prompt_format", "chat"),
    ("PROMPT_FORMAT", " raw ", "prompt_format", "raw"),
    ("DTYPE", "BFloat16", "dtype", "bfloat16"),
    ("DTYPE", "float16", "dtype", "float16"),
    ("CPU_WEIGHTS", "Q8_0", "cpu_weights", "q8_0"),
    ("CPU_WEIGHTS", "float32", "cpu_weights", "float32"),
]


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"),
    [pytest.param(*case, id=f"{case[0]}={case[1]!r}") for case in OVERRIDES],
)
def test_overrides_are_parsed_with_right_types(
    name: str, raw: str, field: str, expected: object
) -> None:
    actual = getattr(ServeConfig.from_env({name: raw}), field)
    assert actual == expected
    assert type(actual) is type(expected)


def test_model_cache_dir_override_is_absolute(tmp_path: Path) -> None:
    config = ServeConfig.from_env({"MODEL_CACHE_DIR": str(tmp_path / "a" / ".." / "b")})
    assert config.model_cache_dir == tmp_path.resolve() / "b"
    assert config.model_cache_dir.is_absolute()


@pytest.mark.parametrize(("name", "raw"), BAD_CASES)
def test_bad_value_raises_config_error_naming_variable_and_range(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        ServeConfig.from_env({name: raw})
    message = str(excinfo.value)
    assert name in message
    assert VARIABLES_BY_NAME[name].accepted in message
    if VARIABLES_BY_NAME[name].secret:
        assert "<hidden>" in message
        assert not raw.strip() or raw.strip() not in message
    else:
        assert repr(raw) in message


def test_the_api_key_is_off_by_default_and_never_in_the_repr() -> None:
    assert ServeConfig.from_env({}).api_key == ""
    key = "s3cret-key-0123456789"
    config = ServeConfig.from_env({"API_KEY": f" {key} "})
    assert config.api_key == key
    assert key not in repr(config)


def test_the_queue_limit_may_be_unbounded() -> None:
    assert ServeConfig.from_env({"MAX_QUEUED_REQUESTS": "-1"}).max_queued_requests == -1


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_max_replicas_below_min_replicas_is_rejected() -> None:
    with pytest.raises(ConfigError) as excinfo:
        ServeConfig.from_env({"MIN_REPLICAS": "3", "MAX_REPLICAS": "2"})
    message = str(excinfo.value)
    assert "MAX_REPLICAS" in message
    assert "MIN_REPLICAS" in message


def test_max_replicas_equal_to_min_replicas_is_accepted() -> None:
    config = ServeConfig.from_env({"MIN_REPLICAS": "3", "MAX_REPLICAS": "3"})
    assert (config.min_replicas, config.max_replicas) == (3, 3)


@pytest.mark.parametrize(
    ("environ", "limit"),
    [
        ({"TARGET_ONGOING_REQUESTS": "33"}, 32),
        ({"TARGET_ONGOING_REQUESTS": "8.5", "MAX_ONGOING_REQUESTS": "8"}, 8),
    ],
    ids=["auto: twice the batch", "set"],
)
def test_a_target_above_what_a_replica_works_on_at_once_is_refused(
    environ: dict[str, str], limit: int
) -> None:
    with pytest.raises(ConfigError, match=f"expected TARGET_ONGOING_REQUESTS <= {limit}$"):
        ServeConfig.from_env(environ)
    at_limit = ServeConfig.from_env({**environ, "TARGET_ONGOING_REQUESTS": str(limit)})
    assert at_limit.target_ongoing_requests == at_limit.ongoing_limit == limit


def test_several_bad_variables_are_reported_in_one_error() -> None:
    bad = {"MODEL_ID": "", "TEMPERATURE": "hot", "MAX_REPLICAS": "two", "PROMPT_FORMAT": "xml"}
    with pytest.raises(ConfigError) as excinfo:
        ServeConfig.from_env(bad)
    message = str(excinfo.value)
    for name in bad:
        assert name in message
        assert VARIABLES_BY_NAME[name].accepted in message
    # Variables left at their defaults are not reported.
    assert "TOP_P" not in message


@pytest.mark.parametrize(
    ("cpus", "threads"),
    [
        pytest.param("0.1", 1, id="tenth-cpu"),
        pytest.param("0.5", 1, id="half-cpu"),
        pytest.param("1", 1, id="one-cpu"),
        pytest.param("2.9", 2, id="fraction-rounds-down"),
        pytest.param("8", 8, id="eight-cpus"),
    ],
)
def test_torch_threads(cpus: str, threads: int) -> None:
    config = ServeConfig.from_env({"NUM_CPUS_PER_REPLICA": cpus})
    assert config.torch_threads == threads
    assert isinstance(config.torch_threads, int)


@pytest.mark.parametrize(
    ("environ", "share"),
    [
        pytest.param({}, 0.9, id="cpu"),
        pytest.param({"NUM_GPUS_PER_REPLICA": "1"}, 0.9, id="one-gpu"),
        pytest.param({"NUM_GPUS_PER_REPLICA": "0.5"}, 0.45, id="half-a-gpu"),
        pytest.param({"NUM_GPUS_PER_REPLICA": "2"}, 0.9, id="two-gpus"),
        pytest.param({"NUM_GPUS_PER_REPLICA": "0.5", "GPU_MEMORY_FRACTION": "0.3"}, 0.3, id="set"),
    ],
)
def test_a_replicas_gpu_memory_share_follows_its_gpu_share(environ: dict, share: float) -> None:
    assert ServeConfig.from_env(environ).gpu_memory_share == pytest.approx(share)


@pytest.mark.parametrize(
    ("environ", "chunk"),
    [
        pytest.param({}, 128, id="one-cpu"),
        pytest.param({"NUM_CPUS_PER_REPLICA": "0.5"}, 128, id="half-a-cpu"),
        pytest.param({"NUM_CPUS_PER_REPLICA": "2"}, 256, id="two-cpus"),
        pytest.param({"NUM_CPUS_PER_REPLICA": "8"}, 256, id="eight-cpus"),
        pytest.param({"NUM_CPUS_PER_REPLICA": "8", "PREFILL_CHUNK_TOKENS": "64"}, 64, id="set"),
    ],
)
def test_a_replicas_prefill_chunk_follows_its_threads(environ: dict, chunk: int) -> None:
    """auto: a pass's piece takes about as long on one thread as on two."""
    assert ServeConfig.from_env(environ).prefill_chunk == chunk


NON_DEFAULT_ENV = {
    "MODEL_ID": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "MAX_NEW_TOKENS": "64",
    "TEMPERATURE": "0",
    "TOP_P": "0.5",
    "NUM_GPUS_PER_REPLICA": "1",
    "GPU_MEMORY_FRACTION": "0.6",
    "NUM_CPUS_PER_REPLICA": "2.5",
    "RESOURCES_PER_REPLICA": '{"llm_node": 1}',
    "MIN_REPLICAS": "1",
    "MAX_REPLICAS": "4",
    "TARGET_ONGOING_REQUESTS": "3.5",
    "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "120",
    "MAX_BATCH_SIZE": "8",
    "PREFILL_CHUNK_TOKENS": "128",
    "PREFIX_CACHE_MB": "64",
    "PREFIX_ROUTING": "off",
    "MAX_PROMPTS": "4",
    "PROMPT_FORMAT": "raw",
    "DTYPE": "float32",
    "CPU_WEIGHTS": "q8_0",
    "MODEL_CACHE_DIR": "/tmp/ray-serve-llm-test-cache",
    "API_KEY": "test-key-0123456789abcdef",
    "MAX_BODY_BYTES": "4096",
    "MAX_ONGOING_REQUESTS": "8",
    "MAX_QUEUED_REQUESTS": "-1",
    "REQUEST_TIMEOUT_S": "30",
    "LLM_METRICS": "off",
    "SPARE_WORKER": "off",
}


def test_non_default_env_covers_every_variable() -> None:
    assert set(NON_DEFAULT_ENV) == set(VARIABLES_BY_NAME)
    defaults = ServeConfig.from_env({})
    configured = ServeConfig.from_env(NON_DEFAULT_ENV)
    for var in VARIABLES:
        assert getattr(configured, var.field) != getattr(defaults, var.field), var.name


@pytest.mark.parametrize(
    "environ",
    [pytest.param({}, id="defaults"), pytest.param(NON_DEFAULT_ENV, id="non-defaults")],
)
def test_as_env_round_trips_through_from_env(environ: dict[str, str]) -> None:
    config = ServeConfig.from_env(environ)
    env = config.as_env()
    assert set(env) == set(VARIABLES_BY_NAME)
    assert all(isinstance(value, str) for value in env.values())
    assert ServeConfig.from_env(env) == config


def test_as_env_values_are_readable() -> None:
    env = ServeConfig.from_env(NON_DEFAULT_ENV).as_env()
    assert env["MODEL_ID"] == NON_DEFAULT_ENV["MODEL_ID"]
    assert int(env["MAX_NEW_TOKENS"]) == 64
    assert math.isclose(float(env["NUM_CPUS_PER_REPLICA"]), 2.5)
    assert env["PROMPT_FORMAT"] == "raw"


def test_config_is_frozen() -> None:
    config = ServeConfig.from_env({})
    with pytest.raises(AttributeError):
        config.max_replicas = 5  # type: ignore[misc]


def test_the_readmes_configuration_table_is_the_one_config_makes() -> None:
    from helpers.config import README, readme_with_table

    readme = README.read_text()
    assert readme_with_table(readme) == readme, (
        "README's configuration table drifted: run `python -m helpers.config` and commit it"
    )


def test_dtype_fp17_is_refused_by_name_with_its_choices() -> None:
    with pytest.raises(ConfigError) as refused:
        ServeConfig.from_env({"DTYPE": "fp17"})
    assert "DTYPE='fp17' is invalid" in str(refused.value)
    assert "auto, float32, bfloat16 or float16" in str(refused.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_q8_0_weights_need_float32_activations(dtype: str) -> None:
    with pytest.raises(
        ConfigError, match=f"CPU_WEIGHTS=q8_0 needs float32 activations, not DTYPE={dtype}"
    ):
        ServeConfig.from_env({"CPU_WEIGHTS": "q8_0", "DTYPE": dtype})
    assert ServeConfig.from_env({"CPU_WEIGHTS": "q8_0", "DTYPE": "auto"}).cpu_weights == "q8_0"
