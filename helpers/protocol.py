"""The types that cross from the ingress to a model replica, and back.

Ray pickles them between processes, so both sides import them from here: a
module with no torch and no Ray, which keeps the always-on ingress from
loading the engine's dependencies only to name its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
"""What the model writes around each tool call, a JSON object with its
``name`` and ``arguments``: the tags Qwen's chat templates (and Hermes')
teach, for every model. The engine's grammar writes them, the ingress reads
them."""


@dataclass(frozen=True)
class Grammar:
    """What a completion must match, token by token. ``kind`` ``json_schema``:
    ``source`` is a JSON schema, as text (``{"type": "object"}`` for any
    object). ``tool_calls``: ``source`` is ``{"functions": [{"name",
    "parameters"}], "choice": "auto" | "required" | a function's name,
    "parallel": bool}`` as text. ``field`` names the request field it came
    from, for a refusal."""

    source: str
    kind: str = "json_schema"
    field: str = "response_format"


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens and when to stop: the only knobs that reach the engine.

    The controls after ``stop`` are vLLM's and OpenAI's, with their defaults
    meaning "off": ``top_k`` 0 (or -1) keeps every token, ``logit_bias``
    maps token ids to what is added to their logits, ``stop_token_ids`` end
    the completion like the end-of-sequence token, which ``ignore_eos``
    decodes past."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return each completion token's log probability with this many likeliest
    alternatives (0 for none); None returns none."""
    grammar: Grammar | None = None
    """Hold the completion to this grammar; it ends when the grammar is whole."""


@dataclass(frozen=True)
class ToolCall:
    """A function call: one an assistant turn carries, or one the model wrote."""

    id: str
    name: str
    arguments: str
    """A JSON object, as text."""


@dataclass(frozen=True)
class Message:
    """One chat turn, as the chat template reads it."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant turn's calls."""
    tool_call_id: str = ""
    """A ``tool`` turn's answer to this call."""


@dataclass(frozen=True)
class Function:
    """A tool the model may call, as the prompt describes it."""

    name: str
    description: str
    parameters: str
    """Its arguments' JSON schema, as text."""


@dataclass(frozen=True)
class Prompt:
    """What a client asked to complete, before the model's formatting.

    ``/generate`` sends text formatted by ``PROMPT_FORMAT``; ``/v1/completions``
    sends raw text or token ids, as OpenAI's completions API does;
    ``/v1/chat/completions`` sends messages, rendered with the tokenizer's chat
    template.
    """

    text: str = ""
    raw: bool = False
    messages: tuple[Message, ...] = ()
    tools: tuple[Function, ...] = ()
    """The functions the chat's prompt offers (``tools``, unless ``tool_choice`` is none)."""
    token_ids: tuple[int, ...] = ()
    """``/v1/completions``'s prompt sent as token ids, fed to the model as they are."""
    echo: bool = False
    """The completion begins with the prompt (``/v1/completions``'s ``echo``)."""
    choice: int = 0
    """Which of the prompt's ``n`` choices this is: a seeded request's choice
    ``i`` samples with ``seed + i``, so the choices differ and each repeats."""


@dataclass(frozen=True)
class TokenLogprob:
    """One completion token's log probability under the model (its
    log-softmax before any sampling control changed the logits) and, where
    asked, the likeliest tokens in its place, each as its text."""

    token: str
    logprob: float | None
    """None for a prompt's first token, which nothing comes before."""
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Timing:
    """Seconds from a sequence's submission to the engine until its first
    token was sampled, and until it ended: what the replica's latency
    metrics observe, whether or not the reply was streamed."""

    first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    logprobs: tuple[TokenLogprob, ...] | None = None
    """Every completion token's, in order, when the request asked for them."""
    timing: Timing | None = field(default=None, compare=False)
    """When the engine decoded it; two completions with equal text are equal."""
    cached_tokens: int = field(default=0, compare=False)
    """Of its prompt tokens, those whose keys and values came from the prefix
    cache rather than being computed (OpenAI's ``cached_tokens``)."""


@dataclass(frozen=True)
class TextDelta:
    """New text for prompt ``index``; the last one for a prompt carries its completion."""

    index: int
    text: str
    completion: Completion | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens decoded since the last delta, when asked for. A token's text
    may come in a later delta than its entry (text is held back while it
    might begin a stop string or end mid-character)."""


class PromptTooLongError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


class FieldError(ValueError):
    """Request field ``field`` was refused by a check only a model replica
    can make: it alone holds the vocabulary and the tokenizer."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message

    def __str__(self) -> str:
        return self.message


class TokenIdError(FieldError):
    """A token id in the field is outside the model's vocabulary."""


class GrammarError(FieldError):
    """The field's schema cannot be compiled into a grammar for the model."""


REFUSALS = (PromptTooLongError, FieldError)
"""What a model replica refuses in a client's request, which the ingress
answers with a 4xx naming the field."""


@dataclass(frozen=True)
class Refused:
    """A request a model replica refused, returned rather than raised: Serve
    logs an exception that a replica method raises as a failed request,
    traceback and all, and counts it among the deployment's errors, and a
    client's bad input is neither. The ingress raises ``error``."""

    error: PromptTooLongError | FieldError


class BatcherClosedError(RuntimeError):
    """The replica's decode loop has stopped before this work could run.

    Defined here, not in the engine, because it crosses to the ingress: there
    it answers 503 with ``Retry-After`` (Serve's health check replaces the
    replica within seconds) and the ingress must not import torch to name it.
    """

    def __init__(self, message: str = "the engine's decode loop has stopped") -> None:
        # An argument, with a default: unpickling in the ingress calls the
        # class with its args, which a no-argument __init__ refuses.
        super().__init__(message)
