"""Unit tests for helpers.api.generate_schema and its translation into API errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from helpers.api.errors import ApiError, validation_error_to_api_error
from helpers.api.generate_schema import GenerateRequest

CONTEXT = {"max_new_tokens": 256, "max_prompts": 4}

WALKTHROUGH_BODY = {
    "prompt": "Write a haiku about Ray Serve.",
    "generation_kwargs": {"max_new_tokens": 64, "temperature": 0.6, "top_p": 0.95},
}

LONG = "x" * 100_000


def validate(body: Any) -> GenerateRequest:
    return GenerateRequest.model_validate(body, context=CONTEXT)


def api_error_for(body: Any) -> ApiError:
    with pytest.raises(ValidationError) as excinfo:
        validate(body)
    return validation_error_to_api_error(excinfo.value, default_param="prompt")


def test_accepts_walkthrough_example_body() -> None:
    request = validate(WALKTHROUGH_BODY)
    assert request.prompt == "Write a haiku about Ray Serve."
    assert request.prompts is None
    kwargs = request.generation_kwargs
    assert kwargs.max_new_tokens == 64
    assert kwargs.temperature == 0.6
    assert kwargs.top_p == 0.95
    assert request.prompt_list() == ["Write a haiku about Ray Serve."]


def test_accepts_prompts_list() -> None:
    prompts = ["one", "two", "three", "four"]
    request = validate({"prompts": prompts})
    assert request.prompt is None
    assert request.prompts == prompts
    assert request.prompt_list() == prompts


def test_prompt_list_is_a_copy() -> None:
    request = validate({"prompts": ["one", "two"]})
    request.prompt_list().append("three")
    assert request.prompt_list() == ["one", "two"]


def test_stream_is_opt_in() -> None:
    assert validate({"prompt": "hi"}).stream is False
    assert validate({"prompt": "hi", "stream": True}).stream is True


def test_generation_kwargs_default_to_unset() -> None:
    kwargs = validate({"prompt": "hi"}).generation_kwargs
    assert (kwargs.max_new_tokens, kwargs.temperature, kwargs.top_p) == (None, None, None)


def test_explicit_nulls_are_unset() -> None:
    body = {
        "prompt": "hi",
        "generation_kwargs": {"max_new_tokens": None, "temperature": None, "top_p": None},
    }
    kwargs = validate(body).generation_kwargs
    assert (kwargs.max_new_tokens, kwargs.temperature, kwargs.top_p) == (None, None, None)


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        pytest.param({"max_new_tokens": 1}, "max_new_tokens", 1, id="max_new_tokens-low-edge"),
        pytest.param({"max_new_tokens": 256}, "max_new_tokens", 256, id="max_new_tokens-at-limit"),
        pytest.param({"temperature": 0}, "temperature", 0.0, id="temperature-int-zero"),
        pytest.param({"temperature": 2.0}, "temperature", 2.0, id="temperature-high-edge"),
        pytest.param({"top_p": 1}, "top_p", 1.0, id="top_p-int-one"),
        pytest.param({"top_p": 1e-6}, "top_p", 1e-6, id="top_p-tiny"),
    ],
)
def test_accepts_edge_values(kwargs: dict[str, Any], field: str, expected: Any) -> None:
    request = validate({"prompt": "hi", "generation_kwargs": kwargs})
    assert getattr(request.generation_kwargs, field) == expected


def gen(**kwargs: Any) -> dict[str, Any]:
    """A body with one valid prompt and the given generation_kwargs."""
    return {"prompt": "hi", "generation_kwargs": kwargs}


MNT = "generation_kwargs.max_new_tokens"
TEMP = "generation_kwargs.temperature"
TOP_P = "generation_kwargs.top_p"

# (id, body, the param the API error must name)
BAD_BODIES: list[tuple[str, Any, str]] = [
    ("missing-prompt", {}, "prompt"),
    ("only-generation-kwargs", {"generation_kwargs": {"temperature": 0.5}}, "prompt"),
    ("both-prompt-and-prompts", {"prompt": "a", "prompts": ["b"]}, "prompt"),
    ("null-prompt-and-prompts", {"prompt": None, "prompts": None}, "prompt"),
    ("empty-prompt", {"prompt": ""}, "prompt"),
    ("non-string-prompt", {"prompt": 5}, "prompt"),
    ("list-as-prompt", {"prompt": ["a"]}, "prompt"),
    ("empty-prompts", {"prompts": []}, "prompts"),
    ("string-as-prompts", {"prompts": "abc"}, "prompts"),
    ("non-string-item", {"prompts": ["ok", 3]}, "prompts.1"),
    ("empty-item", {"prompts": ["ok", "fine", ""]}, "prompts.2"),
    ("nested-list", {"prompts": [["a"]]}, "prompts.0"),
    ("too-many-prompts", {"prompts": ["p"] * 5}, "prompts"),
    ("max_new_tokens-0", gen(max_new_tokens=0), MNT),
    ("max_new_tokens--1", gen(max_new_tokens=-1), MNT),
    ("max_new_tokens-1.5", gen(max_new_tokens=1.5), MNT),
    ("max_new_tokens-str", gen(max_new_tokens="10"), MNT),
    ("max_new_tokens-true", gen(max_new_tokens=True), MNT),
    ("max_new_tokens-257", gen(max_new_tokens=257), MNT),
    ("temperature--0.1", gen(temperature=-0.1), TEMP),
    ("temperature-2.1", gen(temperature=2.1), TEMP),
    ("temperature-nan", gen(temperature=float("nan")), TEMP),
    ("temperature-inf", gen(temperature=float("inf")), TEMP),
    ("temperature-str", gen(temperature="0.5"), TEMP),
    ("temperature-true", gen(temperature=True), TEMP),
    ("top_p-0", gen(top_p=0), TOP_P),
    ("top_p--0.1", gen(top_p=-0.1), TOP_P),
    ("top_p-1.01", gen(top_p=1.01), TOP_P),
    ("top_p-nan", gen(top_p=float("nan")), TOP_P),
    ("unknown-num_beams", gen(num_beams=4), "generation_kwargs.num_beams"),
    (
        "unknown-trust_remote_code",
        gen(trust_remote_code=True),
        "generation_kwargs.trust_remote_code",
    ),
    (
        "unknown-custom_generate",
        gen(custom_generate="org/repo"),
        "generation_kwargs.custom_generate",
    ),
    ("unknown-max_length", gen(max_length=10), "generation_kwargs.max_length"),
    ("generation_kwargs-not-object", {"prompt": "hi", "generation_kwargs": 3}, "generation_kwargs"),
    ("stream-not-bool", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("unknown-top-level-num_beams", {"prompt": "hi", "num_beams": 2}, "num_beams"),
    ("unknown-top-level-model", {"prompt": "hi", "model": "gpt"}, "model"),
    ("unknown-top-level-only", {"max_new_tokens": 10}, "max_new_tokens"),
    ("body-is-list", ["hi"], "prompt"),
    ("body-is-string", "hi", "prompt"),
]

BAD_BODY_PARAMS = [pytest.param(body, param, id=case_id) for case_id, body, param in BAD_BODIES]


@pytest.mark.parametrize(("body", "param"), BAD_BODY_PARAMS)
def test_bad_body_is_rejected(body: Any, param: str) -> None:
    with pytest.raises(ValidationError):
        validate(body)


@pytest.mark.parametrize(("body", "param"), BAD_BODY_PARAMS)
def test_bad_body_becomes_400_naming_the_field(body: Any, param: str) -> None:
    error = api_error_for(body)
    assert isinstance(error, ApiError)
    assert error.status == 400
    assert error.param == param
    assert error.message.startswith(f"{param}: ")
    assert len(error.message) > len(f"{param}: ")
    assert not error.message.startswith(f"{param}: Value error")
    assert str(error) == error.message


def test_max_new_tokens_limit_message_mentions_server_limit() -> None:
    error = api_error_for(gen(max_new_tokens=257))
    assert "256" in error.message
    assert "MAX_NEW_TOKENS" in error.message


def test_too_many_prompts_message_mentions_limit() -> None:
    error = api_error_for({"prompts": ["p"] * 5})
    assert "4" in error.message
    assert "MAX_PROMPTS" in error.message


def test_limits_come_from_context() -> None:
    body = {"prompts": ["p"] * 3, "generation_kwargs": {"max_new_tokens": 100}}
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body, context={"max_new_tokens": 99, "max_prompts": 4})
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body, context={"max_new_tokens": 256, "max_prompts": 2})
    request = GenerateRequest.model_validate(
        body, context={"max_new_tokens": 100, "max_prompts": 3}
    )
    assert request.prompt_list() == ["p"] * 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(gen(num_beams=LONG), "generation_kwargs.num_beams", id="unknown-kwarg"),
        pytest.param({"prompt": "hi", LONG[:10]: LONG}, LONG[:10], id="unknown-top-level"),
        pytest.param(gen(temperature=LONG), TEMP, id="string-temperature"),
        pytest.param(gen(max_new_tokens=LONG), MNT, id="string-max_new_tokens"),
        pytest.param({"prompts": ["ok", [LONG]]}, "prompts.1", id="nested-item"),
        pytest.param({"prompt": "hi", "prompts": [LONG]}, "prompt", id="both-prompt-fields"),
    ],
)
def test_message_does_not_echo_long_input(body: Any, param: str) -> None:
    error = api_error_for(body)
    assert error.param == param
    assert len(error.message) < 300
    assert LONG[:50] not in error.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": "hi", LONG: 1}, id="top-level"),
        pytest.param(gen(**{LONG: 1}), id="generation_kwargs"),
    ],
)
def test_message_does_not_echo_long_unknown_key(body: Any) -> None:
    error = api_error_for(body)
    assert len(error.message) < 300
    assert error.param is None or len(error.param) < 300
