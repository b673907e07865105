"""Which full pages of a paged cache hold which tokens, so that a prompt that
starts as an earlier sequence did reads those pages rather than computing
them again: the paged layout's prefix cache (the padded layout's is
:mod:`helpers.engine.prefix_cache`).

Why pages, and why no budget of their own: a page's keys and values depend
only on the tokens up to its end, and a slot reads its pages through its
row of the block table, so a page several sequences start with can sit in
every one of their rows at once, written once. A sequence's pages are
indexed once they are full (a prompt's when it is prefilled, its output's
when it ends), and when it ends those pages stay where they are, idle,
instead of going back to the free list. They are the cache: the pages the
replica reserved anyway, used while nothing else needs them, and taken
back, least recently used first, when a new sequence does.

A page is known by its parent page and its own tokens, not by a hash of
them: two prompts that differ share no entry, whatever their hashes, so no
request can read another's keys by a collision.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

Key = tuple[int | None, tuple[int, ...]]
"""A page's parent page (None for a sequence's first) and its own tokens."""


class PageIndex:
    """Full pages by what they hold, and those of them no sequence holds now
    (idle), least recently used first."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: dict[Key, int] = {}
        self._keys: dict[int, Key] = {}
        self._children: dict[int, set[int]] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, page: int) -> bool:
        return page in self._keys

    @property
    def idle(self) -> int:
        """Pages indexed that no sequence holds: free for the taking."""
        return len(self._idle)

    def longest(self, tokens: Sequence[int], most: int) -> list[int]:
        """The pages of the longest start of ``tokens`` indexed, at most
        ``most`` of them, in order."""
        pages: list[int] = []
        parent = None
        while len(pages) < min(most, len(tokens) // self.page_size):
            page = self._pages.get((parent, self._chunk(tokens, len(pages))))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def add(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Index a sequence's full pages: ``pages[i]`` holds ``tokens``' i-th
        ``page_size`` tokens, every one of them written. Where another page
        holds the same tokens already, that one stays the entry, and the
        pages after it are indexed under it (their keys and values depend on
        the tokens before them, which are the same)."""
        parent = None
        for number, page in enumerate(pages[: len(tokens) // self.page_size]):
            key = (parent, self._chunk(tokens, number))
            known = self._pages.get(key)
            if known is None and page not in self._keys:
                self._pages[key], self._keys[page] = page, key
                if parent is not None:
                    self._children.setdefault(parent, set()).add(page)
                known = page
            elif known is None:  # indexed already under another start: not this one's to index
                return
            parent = known

    def _chunk(self, tokens: Sequence[int], number: int) -> tuple[int, ...]:
        """The tokens page ``number`` of a sequence holds."""
        return tuple(tokens[number * self.page_size : (number + 1) * self.page_size])

    def held(self, page: int) -> None:
        """A sequence holds ``page`` now: it is not idle."""
        self._idle.pop(page, None)

    def released(self, page: int) -> None:
        """No sequence holds ``page`` now: the most recently used idle page."""
        self._idle[page] = None

    def take(self) -> list[int]:
        """Unindex the least recently used idle page, and the pages indexed
        under it, which nothing can reach without it. Returns those of them
        no sequence holds, to be reused; one a sequence still holds (it
        indexed its pages under an equal one) goes free when it ends."""
        oldest = next(iter(self._idle))
        freed, stack = [], [oldest]
        while stack:
            page = stack.pop()
            key = self._keys.pop(page)
            del self._pages[key]
            if key[0] is not None and key[0] in self._children:
                self._children[key[0]].discard(page)
            stack += self._children.pop(page, set())
            if page in self._idle:
                del self._idle[page]
                freed.append(page)
        return freed
