"""Field types both APIs share, each checked once for ``/generate`` and ``/v1``.

Limits that depend on the deployment (``MAX_NEW_TOKENS``, ``MAX_PROMPTS``)
come in through pydantic's validation context, so the models stay static and
a refusal names the variable that sets the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import InitErrorDetails, PydanticCustomError


def _at_most(
    key: str, variable: str, unit: str = ""
) -> Callable[[int | list, ValidationInfo], int | list]:
    """A validator refusing a count above the deployment's ``info.context[key]``."""

    def check(value: int | list, info: ValidationInfo) -> int | list:
        count = len(value) if isinstance(value, list) else value
        limit = (info.context or {}).get(key)
        if limit is not None and count > limit:
            raise ValueError(f"must be at most {limit}{unit} ({variable})")
        return value

    return check


def refused(model: type[BaseModel], field: str, message: str) -> ValidationError:
    """An error located at ``field``, for a check a model makes on the whole
    body: the refusal names the field a client has to change."""
    error = PydanticCustomError("refused", message)
    detail = InitErrorDetails(type=error, loc=(field,), input=None)
    return ValidationError.from_exception_data(model.__name__, [detail])


def items(**limits: int) -> Any:
    """The limits of a list or map a client sends, whose items are checked
    only up to the first one refused (``fail_fast``). Pydantic otherwise
    checks every item and builds an error for each bad one, on the ingress's
    single event loop: a body of bad token ids within ``MAX_BODY_BYTES``
    would keep every stream the ingress serves waiting. A refusal names one
    field anyway."""
    return Field(fail_fast=True, **limits)


Prompt = Annotated[StrictStr, Field(min_length=1)]
PromptList = Annotated[
    list[Prompt],
    items(min_length=1),
    AfterValidator(_at_most("max_prompts", "MAX_PROMPTS", unit=" prompts")),
]
MAX_TOKEN_ID = 2**31 - 1
"""Larger than any vocabulary (the replica checks the model's own size), and
small enough that an id stays a short number everywhere it goes."""
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], items(min_length=1)]
"""A prompt as token ids; the vocabulary's size is checked by a model replica."""
TokenIdsList = Annotated[
    list[TokenIds],
    items(min_length=1),
    AfterValidator(_at_most("max_prompts", "MAX_PROMPTS", unit=" prompts")),
]
TokenCount = Annotated[
    StrictInt, Field(ge=1), AfterValidator(_at_most("max_new_tokens", "MAX_NEW_TOKENS"))
]
TokenCountOrNone = Annotated[
    StrictInt, Field(ge=0), AfterValidator(_at_most("max_new_tokens", "MAX_NEW_TOKENS"))
]
"""A completion's ``max_tokens``, where 0 (only the prompt, echoed) is allowed."""
# StrictFloat accepts ints (1 is a fine temperature) but refuses "0.5" and true.
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
