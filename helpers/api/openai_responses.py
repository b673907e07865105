"""Response bodies and stream chunks of the OpenAI-compatible endpoints.

Shapes follow OpenAI's API reference: ``text_completion`` and
``chat.completion`` objects, and for streams ``text_completion`` and
``chat.completion.chunk`` objects, with ``usage`` counted by the model's own
tokenizer. One :class:`OpenAIFormat` serves one request, so every chunk of a
stream carries the same ``id`` and ``created``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from helpers.protocol import Completion, TextDelta

OWNED_BY = "ray-serve-llm-kit"


def model_card(model_id: str, created: int, engine: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's model object, plus ``engine``: what serves the model (null
    until a replica has loaded it), a field OpenAI clients ignore."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
        "engine": engine,
    }


def usage(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class OpenAIFormat:
    """Builds one request's response, or its stream chunks (a ``StreamFormat``)."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool = False) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._completions: dict[int, Completion] = {}

    def response(self, completions: Sequence[Completion]) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                **self._content(completion.text, final=True),
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
            for index, completion in enumerate(completions)
        ]
        return {**self._header(chunk=False), "choices": choices, "usage": usage(completions)}

    def opening(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk(0, {"delta": {"role": "assistant", "content": ""}}, None)]

    def events(self, delta: TextDelta) -> list[dict[str, Any]]:
        events = []
        if delta.text:
            events.append(self._chunk(delta.index, self._content(delta.text, final=False), None))
        if delta.completion is not None:
            self._completions[delta.index] = delta.completion
            empty = {"delta": {}} if self.chat else {"text": ""}
            events.append(self._chunk(delta.index, empty, delta.completion.finish_reason))
        return events

    def closing(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        completions = [self._completions[i] for i in sorted(self._completions)]
        return [{**self._header(chunk=True), "choices": [], "usage": usage(completions)}]

    def _header(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _content(self, text: str, final: bool) -> dict[str, Any]:
        if not self.chat:
            return {"text": text}
        if final:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {"content": text}}

    def _chunk(self, index: int, content: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": index, **content, "logprobs": None, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return {**self._header(chunk=True), "choices": [choice], **extra}
