"""How a client's schema is read before it becomes a grammar: objects that
list their properties are closed to others unless they say otherwise."""

from helpers.engine.grammar import closed_objects, tool_calls_lark


def test_objects_with_properties_are_closed_wherever_schemas_nest() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {
        "type": "object",
        "properties": {"at": point, "path": {"type": "array", "items": point}},
        "$defs": {"p": point},
        "anyOf": [point],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["at"]["additionalProperties"] is False
    assert closed["properties"]["path"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["p"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in point, "the client's schema is left as it came"


def test_what_a_schema_says_and_what_is_data_are_kept() -> None:
    open_map = {
        "type": "object",
        "properties": {"a": {}},
        "additionalProperties": {"type": "string"},
    }
    assert closed_objects(open_map)["additionalProperties"] == {"type": "string"}
    assert closed_objects({"type": "object"}) == {"type": "object"}
    data = {"const": {"properties": {"k": 1}}, "enum": [{"properties": {}}]}
    assert closed_objects(data) == data


def test_tool_arguments_are_closed_too() -> None:
    spec = {
        "functions": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {}}}}],
        "choice": "required",
        "parallel": False,
    }
    assert (
        '"arguments": {"type": "object", "properties": {"a": {}}, "additionalProperties": false}'
        in (tool_calls_lark(spec))
    )
