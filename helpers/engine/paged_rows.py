"""The paged layout of the running batch (the kit's Llama on a GPU, or
anywhere when asked, as tests do): slots of a paged KV cache, decode steps of
a few fixed shapes replayed as CUDA graphs, and prompts prefilled in passes
of their own, sized to fit beside the pages (:mod:`helpers.engine.batch_rows`
says what both layouts share).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from helpers.engine.batch_rows import distinct, encode
from helpers.engine.decoder import SlotDecoder
from helpers.engine.kv_cache import PAGE_SIZE, pages_for
from helpers.engine.prefix_cache import MIN_REUSED_TOKENS

SMALLEST_WIDTH = 64
"""Fewest cache columns a decode graph reads; widths double from here."""
PREFILL_TOKENS = 8192
"""Most padded prompt tokens one prefill pass of the paged layout takes. A
longer prompt is prefilled in pieces (:func:`prefill_pieces`)."""
PREFILL_AREA = PREFILL_TOKENS**2
"""Most attention positions (a query, a column it reads) one prefill pass
holds, all its rows together, where no memory budget asks for fewer
(:func:`helpers.engine.kv_budget.prefill_area`): each is a score in every
head, and the attention that takes a mask and grouped heads keeps them all."""
FIRST_PAGES = 16
"""Pages a cache of no fixed size holds at first; it doubles when the
sequences admitted need more."""


def attended(rows: int, length: int, columns: int | None = None) -> int:
    """Attention positions of one prefill pass of ``rows`` prompts padded to
    ``length`` new tokens: each query reads the columns of its pages, up to
    ``columns`` (``length`` where no prompt starts with kept pages)."""
    return rows * length * pages_for(columns or length) * PAGE_SIZE


def one_pass_holds(rows: int, length: int, area: int, columns: int | None = None) -> bool:
    """Whether ``rows`` prompts padded to ``length`` new tokens, reading up to
    ``columns``, fit one prefill pass. Each row gathers the keys and values
    of its columns for attention, so ``rows x columns`` stays within
    ``PREFILL_TOKENS``, as a pass of fresh prompts' tokens does: a kept
    start saves its rows' work, but their reads still take memory."""
    gathered = rows * (columns or length)
    return gathered <= PREFILL_TOKENS and attended(rows, length, columns) <= area


def prefill_groups(
    prompts: list[list[int]], area: int = PREFILL_AREA, begins: list[int] | None = None
) -> list[list[int]]:
    """``prompts``' indices in groups, one prefill pass each, whose columns
    read (the whole of each prompt, padded to the longest) stay within
    ``PREFILL_TOKENS`` and attention positions within ``area``, counting
    only each prompt's new tokens as queries, those past its ``begins``
    (the positions kept pages hold). A prompt past either alone is a group
    of its own, to be cut into :func:`prefill_pieces`. Attention over a
    padded prefill holds ``rows x heads x length x width`` scores, which
    for 256 prompts of a thousand tokens would not fit beside a GPU's
    pages.

    Fewest new tokens first: each pass then pads its prompts to nearly their
    own length, and questions after one kept system prompt go in together.
    Taken in arrival order, prompts of 100 to 1,024 tokens would each be
    padded to about the longest, nearly doubling the work."""
    begins = begins or [0] * len(prompts)
    new = [len(prompt) - begin for prompt, begin in zip(prompts, begins, strict=True)]
    groups: list[list[int]] = []
    group: list[int] = []
    columns = 0  # the group's widest prompt
    for index in sorted(range(len(prompts)), key=new.__getitem__):
        # Sorted, so this prompt has the group's most new tokens.
        wider = max(columns, len(prompts[index]))
        if group and not one_pass_holds(len(group) + 1, new[index], area, wider):
            groups.append(group)
            group, columns = [], 0
        group.append(index)
        columns = max(columns, len(prompts[index]))
    return [*groups, group] if group else groups


def prefill_pieces(length: int, area: int = PREFILL_AREA, start: int = 0) -> list[tuple[int, int]]:
    """A prompt too long for one pass, or its positions from ``start`` (what
    kept pages do not hold), cut into consecutive pieces (start and end),
    each a pass that attends to the ones before it through the cache.
    A piece of ``c`` tokens reading ``w`` columns holds ``c x w`` attention
    positions, so pieces shrink as the columns grow to keep that within
    ``area`` (a piece is still a page at least, and at most
    ``PREFILL_TOKENS``): a 32,768-token prompt in one pass would need
    sixteen times ``PREFILL_AREA``."""
    side = min(PREFILL_TOKENS, max(math.isqrt(area) // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE))
    pieces = []
    while start < length:
        tokens = min(side, area // (start + side)) // PAGE_SIZE * PAGE_SIZE
        end = min(length, start + max(tokens, PAGE_SIZE))
        pieces.append((start, end))
        start = end
    return pieces


def power_of_two_at_least(needed: int, smallest: int) -> int:
    size = smallest
    while size < needed:
        size *= 2
    return size


class PagedRows:
    """Rows in slots of a :class:`helpers.engine.kv_cache.PagedCache`, each
    holding pages for its prompt and its most new tokens from admission on.
    Row r is always in slot r: when rows end, the cache moves the others'
    table rows to the front (:meth:`PagedCache.keep`).

    A decode step runs over the first ``batch`` slots (the smallest power of
    two that holds every row) and reads ``width`` columns (a power of
    two past every position), so a handful of shapes cover a whole run. With
    ``graphs`` each shape is captured as a CUDA graph the first time it is
    needed and replayed after that; without (on CPU, in tests) the same step
    runs eagerly. Idle slots in the step decode a padding token into the
    cache's scratch page, which costs little on a GPU.

    Why pages are reserved at admission: a sequence admitted is then sure to
    finish, and no step ever waits for memory or evicts a sequence to find
    some. The price is room held for new tokens a sequence may not use,
    paid only while it runs; the batcher keeps a sequence waiting until its
    pages are free (:meth:`fitting`).
    """

    folds_prefills = False
    """A decode step here has fixed shapes (a captured graph): prompts are
    prefilled in passes of their own."""

    def __init__(
        self,
        model: SlotDecoder,
        tokenizer: Any,
        slots: int,
        graphs: bool,
        max_positions: int,
        pages: int | None = None,
        prefill_area: int | None = None,
        keeps_prefixes: bool = False,
    ) -> None:
        """A sequence reaches at most ``max_positions`` positions (prompt and
        new tokens). ``pages`` fixes the cache's size and ``prefill_area`` a
        prefill pass's attention (a GPU replica's memory budget,
        :mod:`helpers.engine.kv_budget`; without, ``PREFILL_AREA``); without
        pages, the cache starts at ``FIRST_PAGES`` and doubles when the
        sequences admitted need more, idle kept pages taken back first.
        ``keeps_prefixes``: full pages stay indexed by what they hold, so a
        prompt that starts as an earlier sequence did shares them
        (:mod:`helpers.engine.page_index`)."""
        self.model, self.slots, self.max_pages = model, slots, pages
        self.keeps_prefixes = keeps_prefixes
        self.cached_tokens: list[int] = []  # each prompt the last admit took: positions shared
        self.prefill_area = PREFILL_AREA if prefill_area is None else prefill_area
        self.max_positions = max_positions
        self.prefill_passes = 1  # forward passes the last admit ran
        self.device = model.device
        self.cache = model.new_paged_cache(slots, pages or FIRST_PAGES, max_positions)
        self.graphs: dict[tuple[int, int], DecodeGraph] | None = {} if graphs else None
        self.graph_pool = torch.cuda.graph_pool_handle() if graphs else None
        # Every graph writes its logits here: one buffer for all the shapes.
        self.graph_logits = logits_buffer(model, slots) if graphs else None
        self.pad = tokenizer.pad_token_id or 0
        self.clear()

    def clear(self) -> None:
        self.next_position: list[int] = []  # row (and slot) -> where its next token goes
        self.logits = torch.empty(0)
        self.cache.keep([])

    def fitting(self, positions: list[int]) -> int:
        """How many of these sequences, in order, have room now, each needing
        pages for that many positions (its prompt and most new tokens),
        counted in full though it may share a kept start: room to spare."""
        if self.max_pages is None:  # it grows as they need
            return len(positions)
        free, count = self.cache.available, 0
        for needed in map(pages_for, positions):
            if needed > free:
                break
            free -= needed
            count += 1
        return count

    def admit(self, prompts: list[list[int]], positions: list[int]) -> list[int]:
        """Prefill ``prompts`` (token ids) as new rows, each with pages for
        ``positions`` positions; returns their lengths in tokens. Should a
        pass fail (a GPU out of memory on a long prompt), the new slots'
        pages go back and the running rows are as they were."""
        first = len(self.next_position)
        try:
            return self._admitted(first, prompts, positions)
        except Exception:
            self.keep(list(range(first)))
            raise

    def _admitted(self, first: int, prompts: list[list[int]], positions: list[int]) -> list[int]:
        """:meth:`admit`'s work, with the new rows in the slots from ``first``."""
        slots = list(range(first, first + len(prompts)))
        self._make_room(sum(map(pages_for, positions)))
        unique, order = distinct(prompts)
        prefilled = [slots[order.index(index)] for index in range(len(unique))]
        starts = self._kept_starts(unique)
        # A prompt's copies (a request's n choices) share its kept start too.
        slots_of = zip(slots, order, strict=True)
        shared = {slot: starts[index] for slot, index in slots_of if index in starts}
        self.cache.assign(slots, positions, shared)
        self.prefill_passes = 0
        begins = [len(starts.get(index, ())) * PAGE_SIZE for index in range(len(unique))]
        new_logits = self._prefill_distinct(unique, prefilled, begins, order)
        lengths = [len(unique[index]) for index in order]
        for slot, index, length in zip(slots, order, lengths, strict=True):
            if slot != prefilled[index]:  # a repeated prompt: copy the pages it prefilled
                self.cache.copy(prefilled[index], slot, length)
        if self.keeps_prefixes:
            for index, slot in enumerate(prefilled):
                self.cache.remember(slot, unique[index])
        self.cached_tokens = [begins[index] for index in order]
        self.next_position += lengths
        self.logits = new_logits if len(self.logits) == 0 else torch.cat([self.logits, new_logits])
        return lengths

    def _prefill_distinct(
        self, prompts: list[list[int]], slots: list[int], begins: list[int], order: list[int]
    ) -> torch.Tensor:
        """Prefill distinct ``prompts`` into their ``slots`` in groups
        (:func:`prefill_groups`), each from position ``begins`` (where the
        kept pages it starts with end). The last logits of each prompt
        ``order`` names (every new row's distinct prompt), in that order."""
        groups = prefill_groups(prompts, self.prefill_area, begins)
        last = [
            self._prefill(
                [prompts[i] for i in group], [slots[i] for i in group], [begins[i] for i in group]
            )
            for group in groups
        ]
        # Row r of the passes' logits is prompt passed[r]'s.
        passed = [index for group in groups for index in group]
        row_of = {index: row for row, index in enumerate(passed)}
        rows = torch.tensor([row_of[index] for index in order], device=self.device)
        return torch.cat(last)[rows]

    def _kept_starts(self, prompts: list[list[int]]) -> dict[int, list[int]]:
        """The kept pages each prompt starts with, by index, where they hold at
        least ``MIN_REUSED_TOKENS`` of it; never its last token, whose pass
        gives the logits of the first new one."""
        if not self.keeps_prefixes:
            return {}
        found = {
            index: self.cache.kept.longest(prompt, (len(prompt) - 1) // PAGE_SIZE)
            for index, prompt in enumerate(prompts)
        }
        return {
            i: pages for i, pages in found.items() if len(pages) * PAGE_SIZE >= MIN_REUSED_TOKENS
        }

    def remember(self, rows: list[tuple[int, list[int]]]) -> None:
        """Index the full pages of each ended row, given with the tokens it was
        fed (its prompt, then its output): those before its next position,
        which it has written."""
        if self.keeps_prefixes:
            for row, tokens in rows:
                self.cache.remember(row, tokens[: self.next_position[row]])

    def _prefill(
        self, prompts: list[list[int]], slots: list[int], begins: list[int]
    ) -> torch.Tensor:
        """``prompts`` into their ``slots``, each from position ``begins``
        (what kept pages hold before it): one pass, or one per piece of a
        prompt too long for one. Returns each one's last logits."""
        columns = max(map(len, prompts))
        if len(prompts) == 1 and not one_pass_holds(
            1, columns - begins[0], self.prefill_area, columns
        ):
            *earlier, last = prefill_pieces(columns, self.prefill_area, begins[0])
            for start, end in earlier:
                self._piece(prompts[0], start, end, slots)
            return self._piece(prompts[0], *last, slots)
        new = [prompt[begin:] for prompt, begin in zip(prompts, begins, strict=True)]
        ids, mask = encode(new, self.pad, self.device)
        after = torch.tensor(begins, device=self.device)[:, None]
        places = (mask.cumsum(-1) - 1 + after).masked_fill(mask == 0, self.cache.scratch_position)
        return self._pass(ids, places, slots, columns=columns)

    def _piece(self, prompt: list[int], start: int, end: int, slots: list[int]) -> torch.Tensor:
        """Positions ``start`` to ``end`` of one prompt, after the pieces before."""
        ids = torch.tensor([prompt[start:end]], device=self.device)
        places = torch.arange(start, end, device=self.device)[None]
        return self._pass(ids, places, slots, columns=end)

    def _pass(
        self, ids: torch.Tensor, places: torch.Tensor, slots: list[int], columns: int
    ) -> torch.Tensor:
        """One forward pass writing ``ids`` at ``places`` in ``slots``' pages,
        attending to their first ``columns`` positions; each row's last logits."""
        width = pages_for(columns) * PAGE_SIZE
        self.cache.select(torch.tensor(slots, device=self.device), places, width)
        output = self.model(input_ids=ids, position_ids=places, cache=self.cache, logits_to_keep=1)
        self.prefill_passes += 1
        return output.logits[:, -1, :].float()

    def keep(self, rows: list[int]) -> None:
        self.cache.keep(rows)  # row r moves to slot r
        self.next_position = [self.next_position[row] for row in rows]

    def decode(self, tokens: list[int]) -> None:
        rows = len(self.next_position)
        batch, width = self._step_shape()
        idle = batch - rows  # slots past the rows decode padding into scratch
        step_tokens = [*tokens, *[self.pad] * idle]
        step_positions = [*self.next_position, *[self.cache.scratch_position] * idle]
        # The rows' logits are the step's first; a graph's output is
        # overwritten by the next replay, after the batcher has read these.
        self.logits = self._step(batch, width, step_tokens, step_positions)[:rows]
        self.next_position = [position + 1 for position in self.next_position]

    def step_runs_ahead(self) -> bool:
        """Whether the next :meth:`decode` returns once its step is queued on
        the GPU, before it has run: a graph captured already is replayed. A
        first capture, or an eager step, runs before it returns."""
        return self.graphs is not None and self._step_shape() in self.graphs

    def _step_shape(self) -> tuple[int, int]:
        """The next decode step's slots and columns: powers of two past the
        rows and past every position."""
        batch = min(self.slots, power_of_two_at_least(len(self.next_position), 1))
        width = power_of_two_at_least(max(self.next_position) + 1, SMALLEST_WIDTH)
        return batch, min(width, self.cache.scratch_position)

    def _step(
        self, batch: int, width: int, tokens: list[int], positions: list[int]
    ) -> torch.Tensor:
        if self.graphs is None:
            step = DecodeStep(self.model, self.cache, batch, width)
            return step.run(tokens, positions)
        graph = self.graphs.get((batch, width))
        if graph is None:
            graph = DecodeGraph(
                self.model, self.cache, batch, width, self.graph_pool, self.graph_logits
            )
            self.graphs[batch, width] = graph
        return graph.run(tokens, positions)

    def _make_room(self, pages: int) -> None:
        """Double the cache until ``pages`` more pages are free; the graphs
        captured over the old one are dropped with it. A fixed cache
        refuses, naming the pages it has free."""
        free = self.cache.available
        if pages <= free:
            return
        if self.max_pages is not None:
            raise ValueError(f"{pages} pages are past the {free} this cache has free")
        total = self.cache.pages
        while total - self.cache.pages + free < pages:
            total *= 2
        if self.graphs is not None:  # before the old cache is freed: they read it
            self.graphs.clear()
        self.cache.grow(total)


def logits_buffer(model: SlotDecoder, rows: int) -> torch.Tensor:
    """Room for ``rows`` rows of fp32 logits on the model's device, where a
    captured step writes its output."""
    return torch.empty(rows, model.config.vocab_size, dtype=torch.float32, device=model.device)


class DecodeStep:
    """One decode step over the first ``batch`` slots reading ``width`` columns."""

    def __init__(self, model: SlotDecoder, cache: Any, batch: int, width: int) -> None:
        self.model, self.cache, self.width = model, cache, width
        device = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)

    def forward(self) -> torch.Tensor:
        """Each row's logits, in the model's dtype."""
        self.cache.select(self.rows, self.positions, self.width)
        output = self.model(input_ids=self.tokens, position_ids=self.positions, cache=self.cache)
        return output.logits[:, -1, :]

    def load(self, tokens: list[int], positions: list[int]) -> None:
        self.tokens.copy_(torch.tensor(tokens)[:, None], non_blocking=True)
        self.positions.copy_(torch.tensor(positions)[:, None], non_blocking=True)

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """The step on these inputs: each row's logits in fp32."""
        self.load(tokens, positions)
        return self.forward().float()


class DecodeGraph(DecodeStep):
    """A :class:`DecodeStep` captured as a CUDA graph: each replay launches the
    whole step at once, with the inputs copied into the tensors it captured."""

    def __init__(
        self,
        model: SlotDecoder,
        cache: Any,
        batch: int,
        width: int,
        pool: Any = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        """``pool``: a memory pool shared with the other shapes' graphs, and
        ``logits``: an fp32 buffer of at least ``batch`` rows they all write
        their output to. They never replay at once, and each step's logits
        are read before the next replay, so their buffers need not add up:
        an output of its own, kept alive by each graph, would hold a
        ``batch x vocabulary`` buffer per shape."""
        super().__init__(model, cache, batch, width)
        self.logits = (logits_buffer(model, batch) if logits is None else logits)[:batch]
        self.tokens.fill_(0)
        self.positions.fill_(cache.scratch_position)  # warm-up and capture touch scratch only
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels pick their workspaces before capture
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Serve's health check runs a forward pass of its own on another
        # thread (``Engine.probe``); in the default mode its CUDA calls during
        # a capture would be refused, here only this thread's are checked.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits.copy_(self.forward())

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        self.load(tokens, positions)
        self.graph.replay()
        return self.logits
