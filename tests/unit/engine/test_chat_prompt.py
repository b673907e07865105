"""A conversation with tools, for a template that renders them and for one
that does not (the embedded model's), without a model."""

import json

from helpers.engine.chat_prompt import HOW_TO_CALL, chat_turns, template_renders_tools
from helpers.protocol import TOOL_CALL_OPEN, Function, Message, ToolCall

CLOCK = Function("now", "The time", '{"type":"object","properties":{}}')
CALLED = ToolCall("call_1", "now", '{"zone": "UTC"}')
CHAT = (
    Message("system", "Be brief."),
    Message("user", "Time?"),
    Message("assistant", "", (CALLED,)),
    Message("tool", "noon", tool_call_id="call_1"),
)


def test_only_a_template_that_writes_the_kits_tags_renders_tools_itself() -> None:
    assert template_renders_tools("{% if tools %}... <tool_call> ...{% endif %}")
    assert not template_renders_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_renders_tools(None)


def test_a_template_that_renders_tools_gets_them_as_transformers_passes_them() -> None:
    turns, tools = chat_turns(CHAT, [CLOCK], native=True)
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "now",
                "description": "The time",
                "parameters": json.loads(CLOCK.parameters),
            },
        }
    ]
    assert turns[2]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "now", "arguments": {"zone": "UTC"}},
        }
    ]
    assert turns[3] == {"role": "tool", "content": "noon", "tool_call_id": "call_1"}
    assert chat_turns(CHAT[:2], [], native=True)[1] is None


def test_any_other_template_reads_the_tools_and_calls_as_text_in_the_kits_format() -> None:
    turns, tools = chat_turns(CHAT, [CLOCK], native=False)
    assert tools is None
    assert turns[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '{"name": "now", "description": "The time"' in turns[0]["content"]
    assert (
        turns[2]["content"]
        == f'{TOOL_CALL_OPEN}\n{{"name": "now", "arguments": {{"zone": "UTC"}}}}\n</tool_call>'
    )
    assert turns[3] == {"role": "tool", "content": "<tool_response>\nnoon\n</tool_response>"}
    without_system, _ = chat_turns(CHAT[1:2], [CLOCK], native=False)
    assert without_system[0]["content"] == HOW_TO_CALL.format(
        functions=json.dumps(
            {"name": "now", "description": "The time", "parameters": json.loads(CLOCK.parameters)}
        )
    )
    assert chat_turns(CHAT[1:2], [], native=False) == ([{"role": "user", "content": "Time?"}], None)
