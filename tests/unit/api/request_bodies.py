"""Requests parsed as the ingress parses them, for the API's unit tests.

The request models read the deployment's limits from pydantic's validation
context; these builders pass the same small limits everywhere, so a test
module's refusals mean the same in every module that shares them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from helpers.api.openai_schema import ChatCompletionRequest, CompletionRequest

LIMITS = {"max_new_tokens": 64, "max_prompts": 4}
MODEL = "served-model"


def completion(**fields: Any) -> CompletionRequest:
    """A ``/v1/completions`` body for ``MODEL`` and the prompt "hi", with ``fields`` over it."""
    return CompletionRequest.model_validate(
        {"model": MODEL, "prompt": "hi", **fields}, context=LIMITS
    )


def chat(**fields: Any) -> ChatCompletionRequest:
    """A ``/v1/chat/completions`` body of one user turn, "hi", with ``fields`` over it."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body, context=LIMITS)


def refused_field(make: Callable[..., BaseModel], **fields: Any) -> str:
    """The dotted location of the first error ``make(**fields)`` is refused with."""
    with pytest.raises(ValidationError) as caught:
        make(**fields)
    return ".".join(str(p) for p in caught.value.errors()[0]["loc"])
