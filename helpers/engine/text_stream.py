"""Token ids to text, one token at a time, with stop strings.

Streaming cannot send each token's text on its own: one character can span
several byte-level tokens (a partial character decodes to U+FFFD), a
tokenizer's spacing depends on the tokens before, and a stop string can span
several tokens, so text that may still turn out to start a stop string must be
held back until it is known not to. :class:`TextStream` does all three.

Decoding the whole sequence after every token would cost O(length) per token,
and on a GPU decoding many sequences rival the forward pass (bench/RESULTS.md,
"The GPU layout's host work"); like vLLM's
incremental detokenizer, it decodes only a short window of recent tokens and
keeps the text before it. Concatenating its deltas gives exactly
:attr:`TextStream.text`, the completion a non-streamed request returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class TextStream:
    """The text of one sequence as it grows, cut before the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), incremental: bool = True) -> None:
        """``incremental=False`` (nobody reads the pieces, no stop string to find)
        skips the per-token decoding and decodes once, in :meth:`finish`."""
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.incremental = incremental or bool(self.stop)
        self.tokens: list[int] = []
        self.stopped = False
        self._text = ""
        self._released = 0
        # tokens[_window:_read] were decoded already; tokens[_read:] not yet.
        self._window = 0
        self._read = 0

    @property
    def text(self) -> str:
        """The text decoded so far, never past a stop string."""
        return self._text

    def append(self, token: int) -> str:
        """Add one token; return the new text that is safe to send."""
        self.push(token)
        return self.flush()

    def push(self, token: int) -> None:
        """Add one token, to be decoded by the next :meth:`flush` (or
        :meth:`finish`). Why apart: the batcher records every row's token
        first and decodes them together once all rows are sampled, while a
        replayed CUDA graph computes the next step, or just before an eager
        step."""
        self.tokens.append(token)

    def flush(self) -> str:
        """Decode the tokens pushed since the last call; return the new text
        that is safe to send."""
        if not self.incremental:
            return ""
        self._text += self._decode_new(final=False)
        cut = self._first_stop()
        if cut is not None:
            self._text, self.stopped = self._text[:cut], True
            return self._release(len(self._text))
        return self._release(len(self._text) - self._stop_prefix_length())

    def finish(self) -> str:
        """The sequence ended: decode what was pending and release the rest."""
        if not self.stopped:
            self._text += self._decode_new(final=True)
        return self._release(len(self._text))

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._window : self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._window :], skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT_CHARACTER)):
            return ""  # a partial character, or nothing new yet
        self._window, self._read = self._read, len(self.tokens)
        return after[len(before) :]

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        delta, self._released = self._text[self._released : upto], upto
        return delta

    def _first_stop(self) -> int | None:
        # Only unreleased text can hold a new match, and a stop string can
        # begin at most its own length before it.
        start = max(0, self._released - max((len(s) for s in self.stop), default=0))
        found = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that begins some stop string.

        Runs at every token: only the ends that start with the stop string's
        first character are compared, longest first, rather than every length."""
        longest = 0
        for stop in self.stop:
            tail = self._text[max(0, len(self._text) - len(stop) + 1) :]
            start = tail.find(stop[0])
            while start >= 0 and len(tail) - start > longest:
                if stop.startswith(tail[start:]):
                    longest = len(tail) - start
                    break
                start = tail.find(stop[0], start + 1)
        return longest
