"""The types that cross from the ingress to a model replica, and back.

Ray pickles them between processes, so both sides import them from here: a
module with no torch and no Ray, which keeps the always-on ingress from
loading the engine's dependencies only to name its data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop: the only knobs that reach the engine."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prompt:
    """What a client asked to complete, before the model's formatting.

    ``/generate`` sends text formatted by ``PROMPT_FORMAT``; ``/v1/completions``
    sends raw text, as OpenAI's completions API does; ``/v1/chat/completions``
    sends messages, rendered with the tokenizer's chat template.
    """

    text: str = ""
    raw: bool = False
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"


@dataclass(frozen=True)
class TextDelta:
    """New text for prompt ``index``; the last one for a prompt carries its completion."""

    index: int
    text: str
    completion: Completion | None = None


class PromptTooLongError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""
