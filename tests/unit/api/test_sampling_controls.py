"""The sampling controls both APIs take (helpers/api/sampling_controls.py):
every bad value refused by its field's name, on all three endpoints' models,
and the good ones handed to the engine as ``Sampling``'s fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from helpers.api.generate_schema import GenerateRequest
from helpers.api.sampling_controls import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from helpers.protocol import Sampling

from .request_bodies import LIMITS, chat, completion


def generate(**controls: Any) -> GenerateRequest:
    return GenerateRequest.model_validate(
        {"prompt": "hi", "generation_kwargs": controls}, context=LIMITS
    )


ENDPOINTS = {
    "generate": (generate, "generation_kwargs."),
    "completions": (completion, ""),
    "chat": (chat, ""),
}


def controls_of(parsed: BaseModel) -> dict[str, Any]:
    holder = parsed.generation_kwargs if isinstance(parsed, GenerateRequest) else parsed
    return holder.controls()


BAD = [
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": "5"}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {str(2**31): 1}}, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"logit_bias": {"12": "5"}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "2"}, "stop_token_ids"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("controls", "field"), BAD)
def test_a_bad_control_is_refused_by_its_name(endpoint: str, controls: dict, field: str) -> None:
    make, prefix = ENDPOINTS[endpoint]
    with pytest.raises(ValidationError) as caught:
        make(**controls)
    location = ".".join(str(part) for part in caught.value.errors()[0]["loc"])
    assert location.startswith(prefix + field)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_controls_left_out_are_off(endpoint: str) -> None:
    make, _ = ENDPOINTS[endpoint]
    assert controls_of(make()) == {}
    base = Sampling(max_new_tokens=1, temperature=1.0, top_p=1.0)
    assert (base.top_k, base.min_p, base.repetition_penalty, base.ignore_eos) == (
        0,
        0.0,
        1.0,
        False,
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_controls_reach_the_engine_as_sampling_fields(endpoint: str) -> None:
    make, _ = ENDPOINTS[endpoint]
    parsed = make(
        top_k=-1,
        min_p=0,
        presence_penalty=1,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={"7": -100, "0012": 5.5},
        stop_token_ids=[2, 3],
        ignore_eos=True,
    )
    controls = controls_of(parsed)
    assert controls == {
        "top_k": 0,  # -1 is vLLM's "off", as 0 is
        "min_p": 0.0,
        "presence_penalty": 1.0,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": ((7, -100.0), (12, 5.5)),
        "stop_token_ids": (2, 3),
        "ignore_eos": True,
    }
    sampling = Sampling(max_new_tokens=4, temperature=0.5, top_p=1.0, **controls)
    assert sampling.logit_bias == ((7, -100.0), (12, 5.5))


def test_generate_still_refuses_keys_outside_its_allowlist() -> None:
    with pytest.raises(ValidationError) as caught:
        generate(num_beams=2)
    assert caught.value.errors()[0]["loc"] == ("generation_kwargs", "num_beams")
