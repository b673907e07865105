"""A list or map a client sends is checked only up to its first bad item.

Pydantic otherwise builds an error for every bad item, on the ingress's one
event loop, where every stream it serves waits meanwhile; a refusal names
one field anyway (``helpers.api.fields.items``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from helpers.api.fields import PromptList, TokenIds, TokenIdsList
from helpers.api.generate_schema import GenerateRequest
from helpers.api.openai_schema import ChatCompletionRequest, CompletionRequest
from helpers.api.schema_limits import objects_in
from helpers.api.token_schema import DetokenizeRequest, TokenizeRequest

from .request_bodies import LIMITS, MODEL

MANY = 5_000
REQUEST_MODELS = (
    GenerateRequest,
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
)
HI = [{"role": "user", "content": "hi"}]


def collections_in(schema: Any) -> Iterator[dict[str, Any]]:
    """Every list, map, set or tuple in a pydantic core schema whose items
    can be refused (not ``Any``), nested models included."""
    for node in objects_in(schema):
        items = node.get("items_schema") or node.get("values_schema")
        kind = node.get("type")  # a model's field named "type" holds a schema here
        if kind in ("list", "dict", "set", "tuple") and items != {"type": "any"}:
            yield node


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda model: model.__name__)
def test_every_collection_a_client_sends_stops_at_its_first_bad_item(
    model: type[BaseModel],
) -> None:
    found = list(collections_in(model.__pydantic_core_schema__))
    assert found, "the walk finds the model's lists"
    assert all(schema.get("fail_fast") for schema in found), [
        schema for schema in found if not schema.get("fail_fast")
    ]


@pytest.mark.parametrize(
    ("shape", "value"),
    [(PromptList, [""] * MANY), (TokenIds, [-1] * MANY), (TokenIdsList, [[-1]] * MANY)],
    ids=["strings", "ids", "lists of ids"],
)
def test_each_shape_of_a_completions_prompt_reports_one_error(shape: Any, value: Any) -> None:
    """The prompt is a union of these; pydantic tries each in turn."""
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(shape).validate_python(value)
    assert caught.value.error_count() == 1
    assert caught.value.errors()[0]["loc"][0] == 0


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (DetokenizeRequest, {"model": MODEL, "tokens": [-1] * MANY}, "tokens"),
        (ChatCompletionRequest, {"model": MODEL, "messages": [{"role": "x"}] * MANY}, "messages"),
        (
            ChatCompletionRequest,
            {"model": MODEL, "messages": HI, "logit_bias": {str(i): 500 for i in range(MANY)}},
            "logit_bias",
        ),
        (TokenizeRequest, {"model": MODEL, "messages": [{"role": "x"}] * MANY}, "messages"),
    ],
    ids=["detokenize tokens", "chat messages", "logit_bias", "tokenize messages"],
)
def test_a_body_of_many_bad_items_is_refused_at_the_first(
    model: type[BaseModel], body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body, context=LIMITS)
    assert caught.value.error_count() == 1
    assert [str(part) for part in caught.value.errors()[0]["loc"][:2]] == [field, "0"]
