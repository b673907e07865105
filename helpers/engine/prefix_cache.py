"""Keys and values kept after their sequences end, so that a prompt that
starts the way one of them did is prefilled from where the two part, not
from its first token (automatic prefix caching, as vLLM calls it).

Why: a chat's every turn sends the whole conversation again, and many
requests open with the same system prompt. On a CPU a prompt's prefill costs
arithmetic on every one of its tokens, so without this a conversation's
time to first token grows with each turn, though only its last message is
new. A sequence's keys and values depend only on the tokens before them
(positions count real tokens, so a row's padding changes nothing), and the
padded layout keeps each row's cache as plain tensors: what an ended row
held is what a new prompt with the same first tokens would compute.

What is kept, and for how long: each ended sequence's tokens (its prompt and
the output its cache holds) with their keys and values, within a budget in
bytes, the least recently used going first. An entry that is the start of
a newer one is dropped for it: a chat's turn 3 holds turn 2's tokens. A
prefill that found an entry holds its tensors until it is done, evicted or
not, so the memory in use can pass the budget by what pending prefills hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_REUSED_TOKENS = 32
"""Fewest tokens a prompt must share with a kept sequence to start from it:
a prompt that reuses one goes in as a prefill of its own rather than with
the prompts admitted beside it, which is only worth it for enough tokens."""

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values for one row: ``[1, kv_heads, tokens, head_dim]``."""


@dataclass(frozen=True)
class Prefix:
    """A prompt's first ``tokens`` tokens, already computed: each layer's
    keys and values for them (views of a kept entry, never written to)."""

    tokens: int
    layers: list[LayerKV]


@dataclass(frozen=True)
class _Entry:
    tokens: torch.Tensor
    """Its token ids, 1-D on the CPU: compared with a prompt's at once."""
    layers: list[LayerKV]
    size: int
    """Bytes its keys and values hold."""


class PrefixCache:
    """Ended sequences' keys and values, within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        """Bytes the kept keys and values hold."""
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt: Sequence[int]) -> Prefix | None:
        """The longest start of ``prompt`` a kept sequence shares, if it has at
        least ``MIN_REUSED_TOKENS``; its last token is never one of them,
        since running it gives the logits of the first new token."""
        ids = torch.tensor(prompt, dtype=torch.long)
        best, shared = None, 0
        for key, entry in self._entries.items():
            length = min(len(entry.tokens), len(ids) - 1)
            if length > shared:
                common = _common_start(entry.tokens[:length], ids[:length])
                if common > shared:
                    best, shared = key, common
        if best is None or shared < MIN_REUSED_TOKENS:
            return None
        self._entries.move_to_end(best)
        layers = self._entries[best].layers
        return Prefix(shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in layers])

    def remember(self, tokens: Sequence[int], layers: list[LayerKV]) -> None:
        """Keep a copy of ``layers`` (each layer's keys and values for one row;
        views of a live cache, which goes on changing) as the cache of
        ``tokens``. Kept sequences it starts with are dropped; one it is the
        start of already holds it, and is only marked as used. Whether it is
        kept is settled before anything is copied or dropped: the decode
        thread calls this for every ended row, and a sequence too large for
        the whole budget must not cost a chat the turn already kept."""
        ids = torch.tensor(tokens, dtype=torch.long)
        size = sum(keys.nbytes + values.nbytes for keys, values in layers)
        if len(ids) < MIN_REUSED_TOKENS or size > self.budget:
            return
        starts = []
        for key, entry in self._entries.items():
            both = min(len(entry.tokens), len(ids))
            if _common_start(entry.tokens[:both], ids[:both]) < both:
                continue
            if len(entry.tokens) >= len(ids):
                self._entries.move_to_end(key)
                return
            starts.append(key)
        for key in starts:
            self._drop(key)
        while self.size + size > self.budget:
            self._drop(next(iter(self._entries)))
        copies = [(keys.clone(), values.clone()) for keys, values in layers]
        self._entries[self._next_key] = _Entry(ids, copies, size)
        self._next_key += 1
        self.size += size

    def _drop(self, key: int) -> None:
        self.size -= self._entries.pop(key).size


def _common_start(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many first items two 1-D tensors of one length share."""
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)
