"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

They accept the fields OpenAI documents for ``/v1/completions`` and
``/v1/chat/completions`` that this server honours, and refuse the rest by name
(``extra="forbid"``), so a client never believes a setting took effect when it
did not. Limits that depend on the deployment (``MAX_NEW_TOKENS``,
``MAX_PROMPTS``) are checked by the field types ``/generate`` uses too
(:mod:`helpers.api.fields`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from helpers.api.fields import (
    Prompt,
    PromptList,
    Temperature,
    TokenCount,
    TokenCountOrNone,
    TokenIds,
    TokenIdsList,
    TopP,
    items,
    refused,
)
from helpers.api.response_format import ResponseFormat
from helpers.api.sampling_controls import SamplingControls
from helpers.api.tools import ToolCallIn, ToolFields
from helpers.protocol import Grammar, Message

MAX_STOP_STRINGS = 4
MAX_CHOICES = 8
"""Most choices (``n``) per prompt; their prompt is prefilled once."""
MAX_CHAT_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limits on the alternatives listed per token."""
MAX_STOP_LENGTH = 256
"""Characters in one stop string: each is looked for at every token."""
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _SamplingFields(SamplingControls):
    """Fields both endpoints share."""

    model: StrictStr
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | Annotated[list[StopString], items(min_length=1)] | None = None
    # torch's generators take 64 bits; vLLM bounds it the same way.
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"must hold at most {MAX_STOP_STRINGS} strings")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise refused(type(self), "stream_options", "is only allowed when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def grammar(self) -> Grammar | None:
        return None if self.response_format is None else self.response_format.grammar()


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: a prompt, or a list of them, completed as raw
    text; each prompt may come as token ids instead, as OpenAI documents."""

    prompt: Prompt | PromptList | TokenIds | TokenIdsList
    max_tokens: TokenCountOrNone | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: StrictBool = False

    @model_validator(mode="after")
    def _nothing_to_decode_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise refused(type(self), "max_tokens", "0 is only allowed with echo")
        return self

    def logprob_count(self) -> int | None:
        """How many alternatives each token's entry lists, or None for no entries."""
        return self.logprobs

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_reason_per_shape(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """A refused prompt gets the reason for the shape it came in (a list
        of strings, of token ids...), not one line per shape it is not."""
        try:
            return handler(value)
        except ValidationError:
            shape = _prompt_shape(value)
            if shape is None:
                raise ValueError(
                    "must be a string, a list of strings, a list of token ids "
                    "or a list of such lists"
                ) from None
            try:
                shape.validate_python(value, context=info.context)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                reason = str(first.get("ctx", {}).get("error") or first["msg"])
                raise ValueError(f"item {where}: {reason}" if where else reason) from None
            raise

    def prompt_list(self) -> list[str | tuple[int, ...]]:
        """Each prompt: its text, or its token ids as a tuple."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [tuple(self.prompt)]  # type: ignore[arg-type]
        return [item if isinstance(item, str) else tuple(item) for item in self.prompt]


_SHAPES = {
    str: TypeAdapter(Prompt),
    "strings": TypeAdapter(PromptList),
    "ids": TypeAdapter(TokenIds),
    "lists": TypeAdapter(TokenIdsList),
}


def _prompt_shape(value: Any) -> TypeAdapter | None:
    """The one prompt type ``value`` looks like, by its first item."""
    if isinstance(value, str):
        return _SHAPES[str]
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, str):
        return _SHAPES["strings"]
    if isinstance(first, list):
        return _SHAPES["lists"]
    return _SHAPES["ids"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One turn. ``developer`` is OpenAI's newer name for ``system``. An
    assistant turn may carry the tool calls it made instead of text; a
    ``tool`` turn answers one of them, by its id."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], items(min_length=1)] | None = None
    name: StrictStr | None = None
    tool_calls: Annotated[list[ToolCallIn], items(min_length=1)] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise refused(type(self), "tool_calls", "only an assistant turn makes tool calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise refused(type(self), "tool_call_id", "a tool turn, and only one, needs it")
        if self.content is None and self.tool_calls is None:
            raise refused(type(self), "content", "is required, unless the turn makes tool calls")
        return self

    def as_message(self) -> Message:
        role = "system" if self.role == "developer" else self.role
        content = self.content or ""
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        calls = tuple(call.as_call() for call in self.tool_calls or ())
        return Message(role, content, calls, self.tool_call_id or "")


class ChatCompletionRequest(_SamplingFields, ToolFields):
    """``POST /v1/chat/completions``: messages rendered with the chat template."""

    messages: Annotated[list[ChatMessage], items(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_CHAT_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("is only allowed when logprobs is true")
        return value

    def logprob_count(self) -> int | None:
        """How many alternatives each token's entry lists, or None for no entries."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _one_grammar(self) -> ChatCompletionRequest:
        if self.tool_grammar() is not None and super().grammar() is not None:
            raise refused(
                type(self), "response_format", "JSON output and tool calls cannot be combined"
            )
        return self

    def grammar(self) -> Grammar | None:
        """The tools' grammar, else ``response_format``'s, else None."""
        tools = self.tool_grammar()
        return tools if tools is not None else super().grammar()

    def token_limit(self) -> int | None:
        """OpenAI deprecated ``max_tokens`` for chat in favour of this name."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
