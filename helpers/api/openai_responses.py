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

from helpers.api.tool_calls import ToolCallReader, openai_call, split_tool_calls
from helpers.protocol import Completion, TextDelta, TokenLogprob

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


def usage(completions: Sequence[Completion], choices: int = 1) -> dict[str, Any]:
    """Tokens counted as OpenAI counts them: each prompt once, however many
    ``choices`` it has (they come together, a prompt's choices side by side),
    and of its tokens those the prefix cache held (``cached_tokens``)."""
    prompt = sum(c.prompt_tokens for c in completions[::choices])
    cached = sum(c.cached_tokens for c in completions[::choices])
    completion = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class OpenAIFormat:
    """Builds one request's response, or its stream chunks (a ``StreamFormat``)."""

    def __init__(
        self,
        model: str,
        *,
        chat: bool,
        include_usage: bool = False,
        choices: int = 1,
        tool_calls: bool = False,
    ) -> None:
        """``tool_calls``: the reply may call the request's tools, which are
        read out of its text into ``tool_calls`` (:mod:`helpers.api.tool_calls`)."""
        self.model = model
        self.chat = chat
        self.tool_calls = tool_calls
        self._readers: dict[int, ToolCallReader] = {}  # per choice, when streaming calls
        self.include_usage = include_usage
        self.choices = choices
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._completions: dict[int, Completion] = {}
        self._text_offsets: dict[int, int] = {}  # per choice, where its next token's text starts

    def response(self, completions: Sequence[Completion]) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                **self._content(completion.text, final=True),
                "logprobs": self._logprobs(index, completion.logprobs),
                "finish_reason": completion.finish_reason,
            }
            for index, completion in enumerate(completions)
        ]
        if self.tool_calls:
            for choice, completion in zip(choices, completions, strict=True):
                content, calls = split_tool_calls(completion.text)
                choice["message"]["content"] = content
                if calls:
                    choice["message"]["tool_calls"] = [openai_call(call) for call in calls]
                    choice["finish_reason"] = _finish(completion, called=True)
        counted = usage(completions, self.choices)
        return {**self._header(chunk=False), "choices": choices, "usage": counted}

    def opening(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        opening = {"delta": {"role": "assistant", "content": ""}}
        return [self._chunk(index, opening, None) for index in range(self.choices)]

    def events(self, delta: TextDelta) -> list[dict[str, Any]]:
        if self.tool_calls:
            return self._tool_call_events(delta)
        events = []
        if delta.text or delta.logprobs:
            content = self._content(delta.text, final=False)
            logprobs = self._logprobs(delta.index, delta.logprobs or None)
            events.append(self._chunk(delta.index, content, None, logprobs))
        if delta.completion is not None:
            self._completions[delta.index] = delta.completion
            empty = {"delta": {}} if self.chat else {"text": ""}
            events.append(self._chunk(delta.index, empty, delta.completion.finish_reason))
        return events

    def _tool_call_events(self, delta: TextDelta) -> list[dict[str, Any]]:
        """A chat delta whose text may hold calls: its content as far as it
        cannot be a call, then each call that closed, whole."""
        reader = self._readers.setdefault(delta.index, ToolCallReader())
        text, closed = reader.feed(delta.text)
        if delta.completion is not None:
            text += reader.finish()
        events = []
        if text or delta.logprobs:
            logprobs = self._logprobs(delta.index, delta.logprobs or None)
            events.append(self._chunk(delta.index, {"delta": {"content": text}}, None, logprobs))
        first = len(reader.calls) - len(closed)
        for number, call in enumerate(closed, start=first):
            calls = {"delta": {"tool_calls": [openai_call(call, number)]}}
            events.append(self._chunk(delta.index, calls, None))
        if delta.completion is not None:
            self._completions[delta.index] = delta.completion
            finish = _finish(delta.completion, called=bool(reader.calls))
            events.append(self._chunk(delta.index, {"delta": {}}, finish))
        return events

    def closing(self) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        completions = [self._completions[i] for i in sorted(self._completions)]
        counted = usage(completions, self.choices)
        return [{**self._header(chunk=True), "choices": [], "usage": counted}]

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

    def _logprobs(
        self, index: int, entries: Sequence[TokenLogprob] | None
    ) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` of one choice, or of the tokens one chunk
        adds: chat's ``content`` list, or the completions API's four lists,
        whose ``text_offset`` counts on across a stream's chunks."""
        if entries is None:
            return None
        if self.chat:
            return {"content": [_chat_entry(entry) for entry in entries]}
        offsets, at = [], self._text_offsets.get(index, 0)
        for entry in entries:
            offsets.append(at)
            at += len(entry.token)
        self._text_offsets[index] = at
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            # null for an echoed prompt's first token, as for its logprob
            "top_logprobs": [None if e.logprob is None else dict(e.top) for e in entries],
            "text_offset": offsets,
        }

    def _chunk(
        self,
        index: int,
        content: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return {**self._header(chunk=True), "choices": [choice], **extra}


def _finish(completion: Completion, called: bool) -> str:
    """OpenAI's ``tool_calls`` for a reply that ended on its calls."""
    return (
        "tool_calls" if called and completion.finish_reason == "stop" else completion.finish_reason
    )


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    """A token in chat's ``logprobs.content``, its alternatives alike."""

    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = [token(text, logprob) for text, logprob in entry.top]
    return {**token(entry.token, entry.logprob), "top_logprobs": top}
