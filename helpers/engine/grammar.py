"""Holding a sequence to a grammar, token by token: structured output and tool calls.

Why a grammar and not a retry: a small model asked for JSON often writes
almost-JSON (a trailing comma, a missing brace, prose around it). Masking every
token the grammar cannot take makes the output parse by construction, whatever
the model; only ``max_tokens`` can cut it short.

llguidance does the grammar work (decision record 0028): one ``LLTokenizer``
per engine, built on the first constrained request rather than at load, where
every cold start would pay for it; one matcher per constrained
sequence. The mask of a sequence's next token is computed on a worker thread
while the model runs the step whose logits it will mask: llguidance releases
the GIL, so the two overlap (``MaskWorker``).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import numpy as np
import torch

from helpers.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Grammar, GrammarError

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON on one line, spaced as Python's ``json.dumps`` spaces it. Free
whitespace lets a small model loop on newlines until ``max_tokens``."""
MAX_ERROR_CHARS = 300
"""Longest reason a refused grammar is given with."""
COMPILED_KEPT = 32
"""Grammars a replica keeps compiled: the ones its clients send again."""
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
"""llguidance's default budgets, which bound a hostile schema's cost; its
messages without the parser's internals, which reach the client."""


class Grammars:
    """Compiles requests' grammars against one model's tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        """``vocab_size`` is the width of the model's logits, which may exceed
        the tokenizer's vocabulary: the ids past it are never allowed."""
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # A request's n choices, and a chat's every turn with the same tools,
        # ask for the same grammar: compiled once, each sequence gets a copy.
        self.compile = functools.lru_cache(maxsize=COMPILED_KEPT)(self._compile)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built once, on first use."""
        with self._lock:
            if self._built is None:
                self._built = llguidance.LLTokenizer(
                    _tokenizer_json(self._tokenizer),
                    n_vocab=self._vocab_size,
                    eos_token=self._eos_token_ids,
                )
            return self._built

    def _compile(self, grammar: Grammar) -> CompiledGrammar:
        """``grammar`` compiled for this model (:attr:`compile` keeps the
        latest ones, each shared by the sequences held to it); raises
        :class:`~helpers.protocol.GrammarError` naming the request's field
        when it cannot be."""
        if not self._eos_token_ids:
            raise GrammarError(
                grammar.field,
                f"{grammar.field}: this model declares no end-of-sequence token, so a reply "
                "held to a grammar could not end where the grammar does",
            )
        matcher = llguidance.LLMatcher(self.tokenizer, _source(grammar), log_level=0, limits=LIMITS)
        if matcher.is_error():
            reason = readable_error(matcher.get_error())
            raise GrammarError(grammar.field, f"{grammar.field}: {reason}")
        return CompiledGrammar(matcher, self._vocab_size)


def readable_error(error: str) -> str:
    """llguidance's refusal as a client reads it: its first line, cut short.
    The rest may be the whole grammar it built, or a panic's backtrace with
    this machine's paths, for a schema past what it can build."""
    first = error.strip().partition("\n")[0]
    if first.startswith("panic"):
        return "is too large or complex to build a grammar for"
    return first if len(first) <= MAX_ERROR_CHARS else first[: MAX_ERROR_CHARS - 3] + "..."


class CompiledGrammar:
    """A grammar's matcher at its start, never advanced, and its first mask:
    each sequence held to it gets a copy of both. Both are made once, when
    the request is checked, off the replica's event loop; a copy is cheap
    enough for the loop, where prompts are submitted."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._start = TokenConstraint(matcher, vocab_size)
        self._start.compute_mask()

    def constraint(self) -> TokenConstraint:
        """A fresh matcher for one sequence, with the first mask."""
        return self._start.copy()


class TokenConstraint:
    """One sequence's matcher and the mask of the token it may take next."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def copy(self) -> TokenConstraint:
        """Another sequence's constraint, at the same point, with the same mask."""
        twin = TokenConstraint(self._matcher.deep_copy(), self._vocab_size)
        twin._bits[:] = self._bits
        return twin

    def compute_mask(self) -> None:
        """Fill the mask for the next token (any thread; the GIL is released)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def apply(self, logits: torch.Tensor) -> None:
        """Set to minus infinity, in place, the logits of every token the
        grammar refuses next."""
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._vocab_size]
        refused = allowed == 0
        if logits.device.type == "cpu":
            np.copyto(logits.numpy(), np.float32("-inf"), where=refused)
        else:
            logits.masked_fill_(torch.from_numpy(refused).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Take the sampled token. The mask allowed it, so a refusal here is
        a bug in the grammar library, and raises."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar can take no more tokens: the output is whole."""
        return self._matcher.is_stopped()


class MaskWorker:
    """Computes the next masks of a batch's constrained rows on one thread
    while the decode thread runs the forward pass."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def start(self, constraints: Sequence[TokenConstraint]) -> None:
        if not constraints:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending = self._pool.submit(_compute_masks, list(constraints))

    def wait(self) -> None:
        """Block until the masks started last are ready (re-raising their error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _compute_masks(constraints: list[TokenConstraint]) -> None:
    for constraint in constraints:
        constraint.compute_mask()


def _source(grammar: Grammar) -> str:
    """llguidance's grammar for a request's constraint."""
    spec = json.loads(grammar.source)
    if grammar.kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(tool_calls_lark(spec))
    return llguidance.LLMatcher.grammar_from_json_schema(closed_objects(spec), defaults=JSON_LAYOUT)


SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else")
"""Where JSON Schema nests schemas: by name, in lists, one."""


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that lists its ``properties`` closed to
    others, unless it says otherwise, as xgrammar's strict mode (vLLM's
    default) reads schemas. Left open, a small model fills an object with
    keys copied from the schema itself until ``max_tokens``. Only where
    JSON Schema puts schemas: a ``const`` or an ``enum`` is data, kept as is."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            closed[key] = [closed_objects(sub) for sub in schema[key]]
    for key in SUBSCHEMAS:
        if key in schema:
            closed[key] = closed_objects(schema[key])
    if isinstance(schema.get("properties"), dict):
        closed.setdefault("additionalProperties", False)
    return closed


def tool_calls_lark(spec: dict[str, Any]) -> str:
    """Tool calls as a Lark grammar: each call a JSON object between the
    tags, ``{"name": ..., "arguments": ...}``, its arguments held to that
    function's parameters; with ``auto``, text that never opens a call is
    the other way out. A named function is called once, as OpenAI does."""
    choice = spec["choice"]
    shapes = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": closed_objects(f["parameters"]),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in spec["functions"]
        if choice in ("auto", "required") or f["name"] == choice
    ]
    call = {"anyOf": shapes, "x-guidance": JSON_LAYOUT}
    several = spec["parallel"] and choice in ("auto", "required")
    calls = 'call ("\\n" call)*' if several else "call"
    open_tag, close_tag = json.dumps(TOOL_CALL_OPEN + "\n"), json.dumps("\n" + TOOL_CALL_CLOSE)
    rules = [
        f"start: {'TEXT | calls' if choice == 'auto' else 'calls'}",
        f"calls: {calls}",
        f"call: {open_tag} %json {json.dumps(call)} {close_tag}",
    ]
    if choice == "auto":
        never_opens = re.escape(TOOL_CALL_OPEN)
        rules.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{never_opens}.*)/")
    return "\n".join(rules) + "\n"


def _tokenizer_json(tokenizer: Any) -> str:
    """The ``tokenizers`` definition behind the kit's tokenizer or a
    transformers fast tokenizer, as the engine encodes with it."""
    backend = getattr(tokenizer, "backend", None) or tokenizer.backend_tokenizer
    return backend.to_str()
