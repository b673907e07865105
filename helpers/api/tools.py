"""OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` on chat
completions, and the tool turns of a conversation.

What each choice asks of the engine (:meth:`ToolFields.tool_grammar`):

- ``none``: no tools in the prompt, free text.
- ``auto`` (the default with tools): text, or tool calls and nothing else;
  a call the model begins is held to its function's parameters.
- ``required``: one call or more, of any function.
- a named function: one call of that function, as OpenAI makes it.

``parallel_tool_calls: false`` allows one call at most. The calls are written
between ``<tool_call>`` tags (:data:`~helpers.protocol.TOOL_CALL_OPEN`) and
read back into ``tool_calls`` by :mod:`helpers.api.tool_calls`.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from helpers.api.fields import items, refused
from helpers.api.response_format import Schema, compact
from helpers.protocol import Function, Grammar, ToolCall

MAX_TOOLS = 64
FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
NO_PARAMETERS = {"type": "object", "properties": {}}
"""A function declared without ``parameters`` takes none, as OpenAI reads it."""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: StrictStr = ""
    parameters: Schema = Field(default_factory=lambda: dict(NO_PARAMETERS))
    strict: StrictBool | None = None
    """Accepted; every call is held to its parameters, strict or not."""


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    arguments: StrictStr


class ToolCallIn(BaseModel):
    """A call an assistant turn of the conversation made."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    type: Literal["function"]
    function: CalledFunction

    def as_call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


Tools = Annotated[list[Tool], items(min_length=1, max_length=MAX_TOOLS)]


def functions_of(tools: list[Tool] | None) -> tuple[Function, ...]:
    """What crosses to the replica of each tool: its function, parameters as text."""
    return tuple(
        Function(t.function.name, t.function.description, compact(t.function.parameters))
        for t in tools or []
    )


class ToolFields(BaseModel):
    """The chat request's tool fields, checked against each other."""

    tools: Tools | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> ToolFields:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise refused(type(self), "tools", "function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise refused(
                type(self), "tool_choice", f"no tool named {choice.function.name!r} in tools"
            )
        if choice not in (None, "none") and not names:
            raise refused(type(self), "tool_choice", "needs tools")
        return self

    def offered_functions(self) -> tuple[Function, ...]:
        """The functions the prompt describes: none when ``tool_choice`` is none."""
        return () if self.tool_choice == "none" else functions_of(self.tools)

    def tool_grammar(self) -> Grammar | None:
        """The grammar the engine holds the reply to, None for free text."""
        functions = self.offered_functions()
        if not functions:
            return None
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            choice = choice.function.name
        spec = {
            "functions": [
                {"name": f.name, "parameters": json.loads(f.parameters)} for f in functions
            ],
            "choice": choice,
            "parallel": self.parallel_tool_calls,
        }
        return Grammar(compact(spec), kind="tool_calls", field="tools")
