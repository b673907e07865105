"""Request bodies of ``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes.

Clients that budget a context window count tokens before they send: the
prompt form counts text as ``/v1/completions`` reads it, the chat form counts
messages as ``/v1/chat/completions`` renders them (the template and the
assistant turn's opening included). Only a model replica holds the
tokenizer, so these wake the model like any request.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from helpers.api.fields import TokenIds, items, refused
from helpers.api.openai_schema import ChatMessage
from helpers.api.tools import Tools, functions_of
from helpers.protocol import Function

MAX_DETOKENIZE_TOKENS = 1_000_000
"""Far past any context; it bounds the work, MAX_BODY_BYTES bounds it sooner."""


class TokenizeRequest(BaseModel):
    """``prompt`` (text) or ``messages`` (a chat), never both."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], items(min_length=1)] | None = None
    tools: Tools | None = None
    """Offered with ``messages``: counted as the chat's prompt renders them."""
    add_special_tokens: StrictBool = True

    @model_validator(mode="after")
    def _exactly_one_prompt_field(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
        if self.tools is not None and self.messages is None:
            raise refused(type(self), "tools", "only with messages")
        return self

    def functions(self) -> tuple[Function, ...]:
        return functions_of(self.tools)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    tokens: Annotated[TokenIds, Field(max_length=MAX_DETOKENIZE_TOKENS)]
