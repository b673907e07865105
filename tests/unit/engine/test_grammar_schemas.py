"""How a client's schema is read before it becomes a grammar: objects that
list their properties are closed to others unless they say otherwise."""

from helpers.engine.grammar import MAX_ERROR_CHARS, closed_objects, readable_error, tool_calls_lark


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


def test_a_refusal_reaches_the_client_as_one_short_line() -> None:
    """llguidance may give the whole grammar it built, or a panic's backtrace
    with this machine's paths: the client gets the first line, cut short."""
    panic = "panic: assertion failed: grammar.symbols.len() < u16::MAX\n   0: rust_begin_unwind\n"
    assert readable_error(panic + "/tmp/python-build/Python-3.11.7/x.rs") == (
        "is too large or complex to build a grammar for"
    )
    long = "grammar too large: " + "x ::= y | z " * 10_000 + "\nstart ::= x"
    shown = readable_error(long)
    assert shown.startswith("grammar too large: ") and len(shown) == MAX_ERROR_CHARS
    assert (
        readable_error("Unknown keyword 'fooOf'\n(at /properties/a)") == "Unknown keyword 'fooOf'"
    )
