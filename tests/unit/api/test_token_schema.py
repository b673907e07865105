"""``/tokenize`` and ``/detokenize`` request bodies (helpers/api/token_schema.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from helpers.api.token_schema import DetokenizeRequest, TokenizeRequest


def refused(model: type, body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return ".".join(str(part) for part in caught.value.errors()[0]["loc"])


CLOCK = {"type": "function", "function": {"name": "now"}}


def test_a_chat_is_counted_with_the_tools_it_offers() -> None:
    chat = TokenizeRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": [CLOCK]}
    )
    assert [f.name for f in chat.functions()] == ["now"]


def test_tokenize_takes_a_prompt_or_messages() -> None:
    text = TokenizeRequest.model_validate({"model": "m", "prompt": "Hello"})
    assert text.prompt == "Hello" and text.add_special_tokens
    chat = TokenizeRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.messages is not None and chat.prompt is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m"}, ""),
        ({"model": "m", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, ""),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
        ({"model": "m", "prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
        ({"prompt": "a"}, "model"),
        ({"model": "m", "prompt": "a", "tools": [CLOCK]}, "tools"),
    ],
)
def test_a_bad_tokenize_body_is_refused_by_field(body: dict, field: str) -> None:
    assert refused(TokenizeRequest, body) == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m", "tokens": []}, "tokens"),
        ({"model": "m", "tokens": [1, -1]}, "tokens.1"),
        ({"model": "m", "tokens": "1 2"}, "tokens"),
        ({"model": "m", "tokens": [1.0]}, "tokens.0"),
    ],
)
def test_a_bad_detokenize_body_is_refused_by_field(body: dict, field: str) -> None:
    assert refused(DetokenizeRequest, body) == field
    assert DetokenizeRequest.model_validate({"model": "m", "tokens": [0, 5]}).tokens == [0, 5]
