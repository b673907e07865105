"""A conversation and its tools, as the chat template reads them.

A template that writes ``<tool_call>`` itself (Qwen2.5's and Qwen3's, which
the kit's tag format follows) gets the tools and the turns as transformers
passes them: each function as an OpenAI tool, an assistant's calls as
``tool_calls`` with their arguments as objects, a tool turn with its
``tool_call_id``. Any other template (SmolLM2's knows no tools; Llama 3's
teaches a format of its own that the grammar would then contradict) gets them
written into the text by the kit, in the same format: a system turn that lists
the functions and says how to call one, the calls as tagged JSON in the
assistant's text, each answer between ``<tool_response>`` tags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from helpers.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Function, Message, ToolCall

HOW_TO_CALL = (
    "You can call functions. To call one, reply with nothing but\n"
    f"{TOOL_CALL_OPEN}\n"
    '{{"name": <the function\'s name>, "arguments": <its arguments as a JSON object>}}\n'
    f"{TOOL_CALL_CLOSE}\n"
    "The functions:\n{functions}"
)


def template_renders_tools(template: str | None) -> bool:
    return template is not None and TOOL_CALL_OPEN in template


def chat_turns(
    messages: Sequence[Message], functions: Sequence[Function], native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The turns and the tools to render: for a template that renders tools
    (``native``), as it reads them; for any other, written into the turns."""
    if native:
        tools = [_tool(f) for f in functions] or None
        return [_native_turn(m) for m in messages], tools
    turns = [_written_turn(m) for m in messages]
    if not functions:
        return turns, None
    listed = "\n".join(json.dumps(_tool(f)["function"]) for f in functions)
    system = HOW_TO_CALL.format(functions=listed)
    if turns and turns[0]["role"] == "system":
        turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{system}"}
    else:
        turns.insert(0, {"role": "system", "content": system})
    return turns, None


def written_calls(calls: Sequence[ToolCall]) -> str:
    """Calls as the model writes them, one after another."""
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n"
        + json.dumps({"name": c.name, "arguments": _arguments(c.arguments)})
        + f"\n{TOOL_CALL_CLOSE}"
        for c in calls
    )


def _tool(function: Function) -> dict[str, Any]:
    described = {"name": function.name, "description": function.description}
    return {
        "type": "function",
        "function": described | {"parameters": json.loads(function.parameters)},
    }


def _native_turn(message: Message) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _written_turn(message: Message) -> dict[str, Any]:
    content = message.content
    if message.tool_calls:
        content = "\n".join(part for part in (content, written_calls(message.tool_calls)) if part)
    if message.role == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": message.role, "content": content}


def _arguments(text: str) -> Any:
    """A call's arguments as an object, as templates expect them; the text as
    it came where it does not parse (a client's own malformed history)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
