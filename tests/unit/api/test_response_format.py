"""``response_format`` on both OpenAI endpoints, without a server: what grammar
each format asks the engine for, and which shapes are refused by name."""

import json
from typing import Any

import pytest

from helpers.api.response_format import MAX_SCHEMA_BYTES
from helpers.protocol import Grammar

from .request_bodies import chat, completion, refused_field

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def schema_format(schema: Any = PERSON, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


@pytest.mark.parametrize("make", [chat, completion])
def test_each_format_asks_for_its_grammar(make) -> None:
    assert make().grammar() is None
    assert make(response_format={"type": "text"}).grammar() is None
    assert make(response_format={"type": "json_object"}).grammar() == Grammar('{"type":"object"}')
    held = make(response_format=schema_format(strict=True, description="who")).grammar()
    assert held is not None and json.loads(held.source) == PERSON
    assert held.field == "response_format"


def test_a_json_schema_without_a_schema_accepts_any_json() -> None:
    no_schema = {"type": "json_schema", "json_schema": {"name": "anything"}}
    assert chat(response_format=no_schema).grammar() == Grammar("{}")


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_object", "json_schema": {"name": "x"}}, "response_format"),
        (schema_format() | {"schema": PERSON}, "response_format.schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": PERSON}},
            "response_format.json_schema.name",
        ),
        (schema_format(strict="yes"), "response_format.json_schema.strict"),
        (schema_format(schema=[1]), "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b"}},
            "response_format.json_schema.name",
        ),
        (
            schema_format(schema={"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)}),
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_formats_are_refused_by_name(response_format: dict, param: str) -> None:
    assert refused_field(chat, response_format=response_format) == param


BOTH = {"allOf": [{"multipleOf": 9973}, {"multipleOf": 9967}]}


@pytest.mark.parametrize("divisor", [10007, 12345.6, 1000003, BOTH])
def test_a_multiple_of_with_many_digits_is_refused_before_a_replica_builds_it(
    divisor: float | dict,
) -> None:
    """The grammar for ``multipleOf`` d has a state per remainder, and for
    two divisors of one value a state per pair: a 40-byte schema could keep
    a replica compiling for minutes."""
    held = divisor if isinstance(divisor, dict) else {"multipleOf": divisor}
    integer = {"type": "integer", **held}
    nested = {"type": "object", "properties": {"n": {"anyOf": [integer]}}}
    for schema in (integer, nested):
        assert refused_field(chat, response_format=schema_format(schema)) == (
            "response_format.json_schema.schema"
        )
    function = {"type": "function", "function": {"name": "f", "parameters": nested}}
    assert refused_field(chat, tools=[function]).startswith("tools.0.function.parameters")


@pytest.mark.parametrize("divisor", [7, 1000, 100000, 2.5, 0.0001, 1.5e-7, 9999])
def test_a_multiple_of_with_few_significant_digits_is_accepted(divisor: float) -> None:
    schema = {"type": "number", "multipleOf": divisor, "properties": {"multipleOf": {}}}
    held = chat(response_format=schema_format(schema)).grammar()
    assert held is not None and json.loads(held.source)["multipleOf"] == divisor
