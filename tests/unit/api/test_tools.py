"""Tools on chat completions, without a server: what each ``tool_choice`` asks
of the engine, which bodies are refused by name, and how calls are read back
out of the model's text, whole and streamed."""

import json
from typing import Any

import pytest

from helpers.api.openai_responses import OpenAIFormat
from helpers.api.response_format import MAX_SCHEMA_BYTES
from helpers.api.tool_calls import ToolCallReader, split_tool_calls
from helpers.protocol import Completion, Function, Message, TextDelta, ToolCall

from .request_bodies import MODEL, chat, refused_field

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HUGE = {"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)}
SECOND = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def spec(**fields: Any) -> dict[str, Any] | None:
    grammar = chat(**fields).grammar()
    if grammar is None:
        return None
    assert (grammar.kind, grammar.field) == ("tool_calls", "tools")
    return json.loads(grammar.source)


def test_each_tool_choice_asks_for_its_grammar() -> None:
    tools = [WEATHER, CLOCK]
    auto = spec(tools=tools)
    assert auto is not None and (auto["choice"], auto["parallel"]) == ("auto", True)
    assert [f["name"] for f in auto["functions"]] == ["get_weather", "now"]
    assert auto["functions"][1]["parameters"] == {"type": "object", "properties": {}}
    assert spec(tools=tools, tool_choice="required", parallel_tool_calls=False) == {
        **auto,
        "choice": "required",
        "parallel": False,
    }
    named = {"type": "function", "function": {"name": "now"}}
    assert spec(tools=tools, tool_choice=named)["choice"] == "now"  # type: ignore[index]
    assert spec(tools=tools, tool_choice="none") is None
    assert chat(tools=tools, tool_choice="none").offered_functions() == ()
    assert chat(tools=tools).offered_functions()[1] == Function(
        "now", "The time", '{"type":"object","properties":{}}'
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": HUGE}}]},
            "tools.0.function.parameters",
        ),
    ],
)
def test_malformed_tools_are_refused_by_name(fields: dict, param: str) -> None:
    assert refused_field(chat, **fields).startswith(param)


def test_json_mode_may_come_with_tools_the_model_may_not_call() -> None:
    fields = {"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}}
    grammar = chat(**fields).grammar()
    assert grammar is not None and grammar.kind == "json_schema"


def test_a_conversation_carries_calls_and_their_answers() -> None:
    made = {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [made]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]
    parsed = chat(messages=messages, tools=[CLOCK])
    assert [m.as_message() for m in parsed.messages][1:] == [
        Message("assistant", "", (ToolCall("call_1", "now", "{}"),)),
        Message("tool", "noon", tool_call_id="call_1"),
    ]
    assert refused_field(chat, messages=[messages[0], {**messages[2], "role": "user"}]).startswith(
        "messages.1.tool_call_id"
    )
    assert refused_field(chat, messages=[{**messages[1], "role": "user"}]).startswith(
        "messages.0.tool_calls"
    )


def test_a_reply_of_calls_has_no_content_and_each_call_its_own_id() -> None:
    content, calls = split_tool_calls(f"{CALL}\n{SECOND}")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert split_tool_calls("Sunny, 21 <tool> degrees") == ("Sunny, 21 <tool> degrees", [])
    assert split_tool_calls(CALL[:40]) == (None, [])
    assert split_tool_calls(f"{CALL}\n{SECOND[:30]}")[0] is None


@pytest.mark.parametrize("size", [1, 3, 7, 200])
def test_streamed_pieces_of_any_size_read_as_the_whole_text(size: int) -> None:
    for text in (f"{CALL}\n{SECOND}", "It is <tool noon", "Plain text"):
        reader, content, calls = ToolCallReader(), "", []
        for start in range(0, len(text), size):
            piece, closed = reader.feed(text[start : start + size])
            content += piece
            calls += closed
        content += reader.finish()
        whole_content, whole_calls = split_tool_calls(text)
        assert content == (whole_content or "")
        assert [(c.name, c.arguments) for c in calls] == [
            (c.name, c.arguments) for c in whole_calls
        ]


def test_a_reply_that_called_tools_finishes_with_tool_calls_whole_and_streamed() -> None:
    done = Completion(
        f"{CALL}\n{SECOND}", prompt_tokens=9, completion_tokens=30, finish_reason="stop"
    )
    choice = OpenAIFormat(MODEL, chat=True, tool_calls=True).response([done])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == [
        "get_weather",
        "now",
    ]
    shape = OpenAIFormat(MODEL, chat=True, tool_calls=True)
    events = [*shape.events(TextDelta(0, CALL[:50])), *shape.events(TextDelta(0, CALL[50:]))]
    events += shape.events(TextDelta(0, f"\n{SECOND}", done))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert [d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d] == [0, 1]
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    text_only = Completion("Noon.", prompt_tokens=9, completion_tokens=2, finish_reason="stop")
    plain = OpenAIFormat(MODEL, chat=True, tool_calls=True).response([text_only])["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "Noon."}
    assert plain["finish_reason"] == "stop"
