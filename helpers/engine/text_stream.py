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
        self._stops = [StopMatcher(s) for s in self.stop]
        self._fed = 0  # the text before this was fed to the stop matchers
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
        """Where the earliest stop string in the text begins, if one is whole
        now: only the text decoded since the last call is read."""
        new, offset, self._fed = self._text[self._fed :], self._fed, len(self._text)
        found = [i for i in (m.feed(new, offset) for m in self._stops) if i is not None]
        return min(found) if found else None

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        return max((m.matched for m in self._stops), default=0)


class StopMatcher:
    """One stop string, found in text that arrives a piece at a time
    (Knuth, Morris and Pratt's search): each character costs the same however
    the stop string repeats itself. Comparing every end of the text with
    the stop string instead costs its length squared for a string such as
    ``"a" + "ab" * 127`` after a run of ``a``, at every token of the row."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        """The longest end of the text fed so far that begins ``stop``."""
        self._back = _borders(stop)

    def feed(self, text: str, offset: int) -> int | None:
        """Read ``text``, which begins at ``offset`` of the whole; where the
        first whole ``stop`` begins, or None."""
        stop, back, matched = self.stop, self._back, self.matched
        for index, char in enumerate(text):
            while matched and stop[matched] != char:
                matched = back[matched - 1]
            if stop[matched] == char:
                matched += 1
                if matched == len(stop):
                    self.matched = matched
                    return offset + index + 1 - matched
        self.matched = matched
        return None


def _borders(word: str) -> list[int]:
    """For each prefix of ``word``, the longest proper prefix that is also its end."""
    borders, length = [0] * len(word), 0
    for index in range(1, len(word)):
        while length and word[index] != word[length]:
            length = borders[length - 1]
        if word[index] == word[length]:
            length += 1
        borders[index] = length
    return borders
