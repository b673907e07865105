"""The running batch's tensors (KV cache, positions, last logits), kept one of two ways.

The continuous batcher (:mod:`helpers.engine.batcher`) decides which
sequences run; the classes here hold their tensors, one row per sequence, in
the batcher's row order, and run the model over them:

- :class:`PaddedRows`, on CPU and for transformers' models: the cache grows
  by one column per step and rows are left-padded to a common length within
  groups of rows of about one length (:class:`RowGroup`). No
  memory is reserved ahead and no arithmetic is spent on columns nobody
  reads, which is what matters where the arithmetic is the cost.
- :class:`PagedRows`, for the kit's own Llama on a GPU: each sequence owns
  a row ("slot") of a paged cache's block table and the pages it lists, so
  every decode step has the same shapes and addresses and is replayed as one
  CUDA graph, while each sequence holds pages for its own prompt and
  ``max_new_tokens`` only, not for the longest sequence's length. A small
  model's decode step is a thousand small kernels, and launching them one
  by one from Python costs far more than running them.

Both take the same calls: how many waiting sequences have room
(``fitting``), ``admit`` prompts (one prefill pass for all of them, or a few
for many or very long ones: ``prefill_passes``), ``keep`` some rows, ``decode`` one
token per row (whether it returns before the step has run: ``step_runs_ahead``),
``clear``. Where ``folds_prefills``, prompts can instead go in a piece per
decode step (``prefill``, then ``decode(tokens, pieces)``). ``logits`` holds
each row's last logits after ``admit`` and ``decode``; ``keep`` leaves it
stale, since the batcher always decodes next.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from helpers.engine.decoder import Decoder, Segment, SegmentDecoder, SlotDecoder
from helpers.engine.kv_cache import PAGE_SIZE, pages_for

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
ROW_GROUPS = 4
"""Most groups of rows :class:`PaddedRows` keeps apart, each padded to its
own length, where the model takes several segments in one pass."""
PADDING_SHARE = 0.5
"""Most padding new rows may add to a group they join, as a share of the
columns the group and they hold apart: past it they start a group of their
own (while there is room for one). Prompts admitted together are grouped
by the same value, held to each whole group (:func:`length_groups`)."""
PREFILL_CHUNK = 256
"""Most prompt tokens one pass of :class:`PaddedRows` prefills beside its
running rows' decode step, where no setting asks otherwise: a longer prompt
goes in over several passes (:class:`Prefill`)."""
FIRST_PAGES = 16
"""Pages a cache of no fixed size holds at first; it doubles when the
sequences admitted need more."""


def encode(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token ids and attention mask of ``prompts``, left-padded with ``pad``
    (which the mask hides), on ``device``."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts, and for each prompt the index of its distinct
    one. A prompt asked for several choices (``n``) is prefilled once; its
    other rows copy that row's cache."""
    first: dict[tuple[int, ...], int] = {}
    order = [first.setdefault(tuple(prompt), len(first)) for prompt in prompts]
    return [list(prompt) for prompt in first], order


def attended(rows: int, length: int) -> int:
    """Attention positions of one prefill pass of ``rows`` prompts padded to
    ``length`` tokens: each query reads the columns of its pages."""
    return rows * length * pages_for(length) * PAGE_SIZE


def one_pass_holds(rows: int, length: int, area: int) -> bool:
    """Whether ``rows`` prompts padded to ``length`` tokens fit one prefill pass."""
    return rows * length <= PREFILL_TOKENS and attended(rows, length) <= area


def prefill_groups(prompts: list[list[int]], area: int = PREFILL_AREA) -> list[list[int]]:
    """``prompts``' indices in groups, one prefill pass each, whose padded
    tokens stay within ``PREFILL_TOKENS`` and attention positions within
    ``area`` (a prompt past either alone, to be cut into
    :func:`prefill_pieces`). Attention over a padded prefill holds
    ``rows x heads x length x width`` scores, which for 256 prompts of a
    thousand tokens would not fit beside a GPU's pages.

    Shortest first: each pass then pads its prompts to nearly their own
    length. Taken in arrival order, prompts of 100 to 1,024 tokens would
    each be padded to about the longest, nearly doubling the work."""
    groups: list[list[int]] = []
    group: list[int] = []
    for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        # Sorted, so this prompt is the group's longest.
        if group and not one_pass_holds(len(group) + 1, len(prompts[index]), area):
            groups.append(group)
            group = []
        group.append(index)
    return [*groups, group] if group else groups


def prefill_pieces(length: int, area: int = PREFILL_AREA) -> list[tuple[int, int]]:
    """A prompt too long for one pass cut into consecutive pieces (start and
    end), each a pass that attends to the ones before it through the cache.
    A piece of ``c`` tokens reading ``w`` columns holds ``c x w`` attention
    positions, so pieces shrink as the columns grow to keep that within
    ``area`` (a piece is still a page at least, and at most
    ``PREFILL_TOKENS``): a 32,768-token prompt in one pass would need
    sixteen times ``PREFILL_AREA``."""
    side = min(PREFILL_TOKENS, max(math.isqrt(area) // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE))
    pieces, start = [], 0
    while start < length:
        tokens = min(side, area // (start + side)) // PAGE_SIZE * PAGE_SIZE
        end = min(length, start + max(tokens, PAGE_SIZE))
        pieces.append((start, end))
        start = end
    return pieces


def added_padding(held: tuple[int, int], new: tuple[int, int]) -> int:
    """Padding columns that rows ``new`` add, joining rows ``held`` (each
    ``(rows, columns)``, left-padded to one length): both sides padded to
    the longer."""
    (rows, width), (new_rows, new_width) = held, new
    return (rows + new_rows) * max(width, new_width) - rows * width - new_rows * new_width


def length_groups(lengths: Sequence[int], most: int) -> list[list[int]]:
    """The indices of prompts admitted together, in at most ``most`` (1 or
    more) groups of about one length, each to be left-padded as one prefill
    of :class:`PaddedRows`; shortest first. (The paged layout's passes group
    by their size instead: :func:`prefill_groups`.)

    Why: admitted as one prefill, prompts are padded to the longest, so a
    question that comes in the same step as a document (a burst queued
    during a cold start) would cost a document's columns to prefill, wait
    for all of it, and decode among its padding. A prompt joins the group
    before it while the group's padding stays within ``PADDING_SHARE`` of
    its prompts' own tokens, the share a finished prefill may add to a
    running group (for two prompts the two rules agree). Identical prompts
    add none, so a request's ``n`` choices still share one prefill. Past
    ``most`` groups, the neighbours that pad each other least merge, as
    running groups do: more than ``most`` prefills would only be merged
    again as they joined the rows, a cache copy each."""
    groups: list[list[int]] = []
    tokens = 0  # the last group's prompts' own tokens
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[index]  # sorted, so the longest of the last group if it joins
        if groups and (len(groups[-1]) + 1) * length <= (1 + PADDING_SHARE) * (tokens + length):
            groups[-1].append(index)
            tokens += length
        else:
            groups.append([index])
            tokens = length
    while len(groups) > most:
        shapes = [(len(group), lengths[group[-1]]) for group in groups]
        added = [added_padding(a, b) for a, b in itertools.pairwise(shapes)]
        pair = added.index(min(added))
        groups[pair : pair + 2] = [groups[pair] + groups[pair + 1]]
    return groups


def power_of_two_at_least(needed: int, smallest: int) -> int:
    size = smallest
    while size < needed:
        size *= 2
    return size


class PaddedRows:
    """A growing, left-padded KV cache, kept as groups of rows
    (:class:`RowGroup`); each row's mask hides its padding.

    With the kit's Llama, new prompts can also ride along decode steps
    (``folds_prefills``): one pass decodes the running rows and prefills a
    piece of the new ones (:class:`Prefill`), so the weights are read once
    for both. On CPU a prefill of a short prompt alone costs about as much as
    a decode step, since both are bound by reading the weights; folded, it
    costs little more than its own tokens' arithmetic, and the running rows
    wait for one piece at most.

    Why groups: padded to one length, every row reads and copies as many
    columns as the longest row each step, so one long prompt in the batch
    slowed every stream several times over, and joining it rewrote every
    row's cache. The same model takes each group as a segment of one pass
    (:meth:`SegmentDecoder.forward_segments`), so rows of very different
    lengths are kept apart, up to ``groups`` groups (decision 0037).
    """

    max_positions = None
    """No limit of its own on a sequence's length."""
    prefill_passes = 1
    """Forward passes the last ``admit`` ran: always one here."""

    def __init__(self, model: Decoder, tokenizer: Any, groups: int = ROW_GROUPS) -> None:
        if groups < 1:
            raise ValueError(f"groups must be at least 1, not {groups}")
        self.model = model
        self.pad = tokenizer.pad_token_id or 0
        self.folds_prefills = isinstance(model, SegmentDecoder)
        self.max_groups = groups if self.folds_prefills else 1
        self.clear()

    def clear(self) -> None:
        self.groups: list[RowGroup] = []
        self.logits = torch.empty(0)

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.groups)

    def fitting(self, positions: list[int]) -> int:
        """All of them: the cache grows a column a step, with no room held ahead."""
        return len(positions)

    def step_runs_ahead(self) -> bool:
        """Never: a step here is launched op by op, and on a GPU a folded
        prefill reads its rows' lengths back before :meth:`decode` returns."""
        return False

    def admit(self, prompts: list[list[int]], positions: list[int]) -> list[int]:
        """Prefill ``prompts`` (token ids) as new rows after the running ones,
        in one pass; returns their lengths in tokens. ``positions``, what each
        may reach, matters only to :class:`PagedRows`, which holds room for
        it. Should it raise, the running rows are as they were (both layouts
        promise it)."""
        prefill = self.prefill(prompts)
        self.decode([], [(prefill, prefill.left)], may_insert=False)
        assert prefill.lengths is not None  # its one piece was its last
        return prefill.lengths

    def prefills_by_length(self, prompts: list[list[int]]) -> list[tuple[list[int], Prefill]]:
        """``prompts`` admitted together, made ready to be prefilled in groups
        of about one length, no more groups than the rows keep
        (:func:`length_groups`): each group's indices among them and its
        :class:`Prefill`. With one row group, one prefill for all of them."""
        groups = length_groups(list(map(len, prompts)), self.max_groups)
        return [(group, self.prefill([prompts[i] for i in group])) for group in groups]

    def prefill(self, prompts: list[list[int]]) -> Prefill:
        """``prompts`` (token ids) made ready to be prefilled piece by piece
        (:meth:`decode`), in a cache of their own until the last piece."""
        unique, order = distinct(prompts)
        ids, mask, places = self._encode(unique)
        return Prefill(ids, mask, places, order, self.model.new_cache())

    def _encode(self, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Token ids, mask and position ids of new rows."""
        ids, mask = encode(prompts, self.pad, self.model.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _add_rows(self, new: RowGroup, logits: torch.Tensor, may_insert: bool) -> int:
        """Put prefilled rows in a group (:func:`group_for`); returns the
        index of the first of them among all the rows. Should it raise, the
        rows are as they were."""
        assert len(self.logits) == self.rows, "each row's logits, read before any row left"
        index = group_for(self.groups, new, self.max_groups, may_insert)
        if index < len(self.groups) and not self.groups[index].takes(new):
            index = self._merge_neighbours(index, new)
        # Past the rows of the group they join; past all of them for a new one.
        at = sum(group.rows for group in self.groups[: index + 1])
        last = logits[:, -1, :].float()
        joined = torch.cat([self.logits[:at], last, self.logits[at:]]) if self.rows else last
        if index == len(self.groups):
            self.groups.append(new)
        else:
            self.groups[index].merge(new)
        self.logits = joined
        return at

    def _merge_neighbours(self, index: int, new: RowGroup) -> int:
        """With every group taken and none that ``new`` fits: merge the two
        neighbouring groups that pad each other least, where that adds less
        padding than ``new`` would add to group ``index``, so that ``new``
        gets a group of its own; returns the group ``new`` joins. Neighbours
        only: the rows keep their order."""
        added = {
            i: self.groups[i].padding_with(self.groups[i + 1]) for i in range(len(self.groups) - 1)
        }
        pair = min(added, key=added.__getitem__, default=None)
        if pair is None or added[pair] >= self.groups[index].padding_with(new):
            return index
        self.groups[pair].merge(self.groups[pair + 1])
        del self.groups[pair + 1]
        return len(self.groups)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending), then drop padding columns no
        remaining row of a group needs; groups left empty go."""
        assert rows == sorted(rows), "rows keep their order"
        kept, start = [], 0
        for group in self.groups:
            mine = [row - start for row in rows if start <= row < start + group.rows]
            start += group.rows
            if mine:
                group.keep(mine)
                kept.append(group)
        self.groups = kept

    def decode(
        self,
        tokens: list[int],
        pieces: Sequence[tuple[Prefill, int]] = (),
        may_insert: bool = True,
    ) -> None:
        """One forward pass: a token for every running row (``tokens``, none
        while no row runs, or while :meth:`admit` prefills apart) and, with
        ``pieces`` (where ``folds_prefills``), each prefill's next
        ``columns``, a segment each. A prefill whose last piece this was
        joins the rows, its ``lengths`` and ``row`` set, in the order of
        ``pieces``; ``may_insert`` lets it join a group before the last."""
        segments = [prefill.piece(columns) for prefill, columns in pieces]
        steps = []
        if tokens:
            assert len(tokens) == self.rows, "a token for every row"
            start = 0
            for group in self.groups:
                steps.append(group.step(tokens[start : start + group.rows]))
                start += group.rows
        outputs = self._forward(steps + segments)
        if tokens:
            for group in self.groups:
                group.positions = group.positions + 1
            self.logits = torch.cat([out[:, -1, :] for out in outputs[: len(steps)]]).float()
        for (prefill, columns), logits in zip(pieces, outputs[len(steps) :], strict=True):
            prefill.done += columns
            if not prefill.left:
                cache, mask, positions, logits = _copied(
                    prefill.order, prefill.cache, prefill.mask, prefill.positions, logits
                )
                new = RowGroup(cache, mask, positions[:, -1:] + 1)
                prefill.row = self._add_rows(new, logits, may_insert)
                prefill.lengths = mask.sum(-1).tolist()

    def _forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Each segment's logits: one segment is a plain call, which every
        :class:`Decoder` takes; several need a :class:`SegmentDecoder`."""
        if len(segments) > 1:
            assert isinstance(self.model, SegmentDecoder)
            return self.model.forward_segments(segments)
        (segment,) = segments
        output = self.model(
            input_ids=segment.input_ids,
            attention_mask=segment.attention_mask,
            position_ids=segment.position_ids,
            cache=segment.cache,
            logits_to_keep=segment.logits_to_keep,
        )
        return [output.logits]


def group_for(groups: list[RowGroup], new: RowGroup, most: int, may_insert: bool) -> int:
    """The index of the group that the rows of ``new`` join, ``len(groups)``
    for a group of their own. Of the groups where they add at most
    ``PADDING_SHARE`` of padding, the one they pad least; with none, a group
    of their own while there are fewer than ``most``; else the group they
    pad least. Only the last group may take them unless ``may_insert``, so
    that they come after every running row."""
    candidates = range(len(groups)) if may_insert else range(len(groups))[-1:]
    added = {i: groups[i].padding_with(new) for i in candidates}
    fits = [i for i in candidates if groups[i].takes(new)]
    if fits:
        return min(fits, key=added.__getitem__)
    if len(groups) < most:
        return len(groups)
    return min(added, key=added.__getitem__)


class RowGroup:
    """Rows of :class:`PaddedRows` left-padded to one length, with a KV
    cache of their own: each row's mask hides its padding and its position
    ids count its real tokens."""

    def __init__(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask
        self.positions = positions
        """Each row's next position, ``[rows, 1]``."""

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Its rows, and the cache columns each holds, padding included."""
        return self.mask.shape[0], self.mask.shape[1]

    def takes(self, new: RowGroup) -> bool:
        """Whether the rows of ``new`` would add at most ``PADDING_SHARE`` of
        padding, joining this group."""
        held_apart = self.mask.numel() + new.mask.numel()
        return self.padding_with(new) <= PADDING_SHARE * held_apart

    def padding_with(self, new: RowGroup) -> int:
        """Padding columns the rows of ``new`` would add, joining this group."""
        return added_padding(self.shape, new.shape)

    def step(self, tokens: list[int]) -> Segment:
        """A decode step's segment for these rows, their masks a column longer."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        ids = torch.tensor(tokens, device=self.mask.device)[:, None]
        return Segment(ids, self.cache, self.positions, self.mask)

    def merge(self, new: RowGroup) -> None:
        """Append the rows of ``new``, left-padding whichever side is shorter.

        Layer by layer, so only one layer's copy is held twice at a time. A
        copy that fails (out of memory) cuts the layers done back to these
        rows, so :meth:`PaddedRows.admit` fails the new rows alone."""
        rows = self.rows
        length = max(self.mask.shape[1], new.mask.shape[1])
        mine, theirs = length - self.mask.shape[1], length - new.mask.shape[1]
        # The small tensors first, kept aside until every layer is merged.
        merged_mask = torch.cat([F.pad(self.mask, (mine, 0)), F.pad(new.mask, (theirs, 0))])
        merged_positions = torch.cat([self.positions, new.positions])
        try:
            for layer, more in zip(self.cache.layers, new.cache.layers, strict=True):
                layer.keys = _stacked(layer.keys, more.keys, length)
                layer.values = _stacked(layer.values, more.values, length)
        except Exception:
            for layer in self.cache.layers:
                if layer.keys.shape[0] > rows:
                    layer.keys = layer.keys[:rows, :, mine:]
                if layer.values.shape[0] > rows:
                    layer.values = layer.values[:rows, :, mine:]
            raise
        self.mask, self.positions = merged_mask, merged_positions

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``, then drop padding columns none of them needs."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


class Prefill:
    """Prompts on their way into a :class:`PaddedRows` batch, left-padded
    together and prefilled into a cache of their own a piece at a time, each
    piece riding one of the running rows' decode steps
    (:meth:`PaddedRows.decode`); they join the rows with their last piece.

    Why pieces: a long prompt prefilled in one pass holds every running row
    for all of its arithmetic, which on a CPU is seconds per thousand tokens.
    A piece attends to the pieces before it through the cache, so the rows'
    text is what one pass would give."""

    def __init__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        order: list[int],
        cache: Any,
    ) -> None:
        self.ids, self.mask, self.positions = ids, mask, positions
        self.order = order  # each prompt's distinct row (see distinct)
        self.cache = cache
        self.done = 0
        """Columns prefilled so far."""
        self.lengths: list[int] | None = None
        """Each prompt's length in tokens, once it has joined the rows."""
        self.row: int | None = None
        """Where it joined: the index of its first row among all the rows."""

    @property
    def rows(self) -> int:
        """Rows each column costs: one per distinct prompt."""
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        """Columns in all: its longest prompt's tokens."""
        return self.ids.shape[1]

    @property
    def left(self) -> int:
        """Columns not yet prefilled."""
        return self.width - self.done

    def piece(self, columns: int) -> Segment:
        """The next ``columns`` as a segment over the cache so far; each row's
        last logits are kept, which only the last piece's are read of."""
        assert 0 < columns <= self.left
        end = self.done + columns
        return Segment(
            self.ids[:, self.done : end],
            self.cache,
            self.positions[:, self.done : end],
            self.mask[:, :end],
            logits_to_keep=1,
        )


def _copied(
    order: list[int], cache: Any, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefilled rows of distinct prompts laid out as ``order`` asks, each
    repeated prompt's row copied."""
    if order == list(range(len(order))) and len(order) == mask.shape[0]:
        return cache, mask, positions, logits
    index = torch.tensor(order, device=mask.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache, mask[index], positions[index], logits[index]


def _stacked(rows: torch.Tensor, more: torch.Tensor, length: int) -> torch.Tensor:
    """Two [batch, heads, columns, dim] cache tensors, one's rows after the
    other's, each left-padded with zeros to ``length`` columns: one tensor,
    written once. Padding each side first and then joining them allocated
    and wrote a long prompt's cache two or three times over (decision 0035)."""
    batch, heads, _, dim = rows.shape
    stacked = rows.new_zeros((batch + more.shape[0], heads, length, dim))
    stacked[:batch, :, length - rows.shape[2] :] = rows
    stacked[batch:, :, length - more.shape[2] :] = more
    return stacked


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
    ) -> None:
        """A sequence reaches at most ``max_positions`` positions (prompt and
        new tokens). ``pages`` fixes the cache's size and ``prefill_area`` a
        prefill pass's attention (a GPU replica's memory budget,
        :mod:`helpers.engine.kv_budget`; without, ``PREFILL_AREA``); without
        pages, the cache starts at ``FIRST_PAGES`` and doubles when the
        sequences admitted need more."""
        self.model, self.slots, self.max_pages = model, slots, pages
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
        pages for that many positions (its prompt and most new tokens)."""
        if self.max_pages is None:  # it grows as they need
            return len(positions)
        free, count = len(self.cache.free), 0
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
        self.cache.assign(slots, positions)
        unique, order = distinct(prompts)
        prefilled = [slots[order.index(index)] for index in range(len(unique))]
        self.prefill_passes = 0
        groups = prefill_groups(unique, self.prefill_area)
        last = [
            self._prefill([unique[i] for i in group], [prefilled[i] for i in group])
            for group in groups
        ]
        lengths = [len(unique[index]) for index in order]
        for slot, index, length in zip(slots, order, lengths, strict=True):
            if slot != prefilled[index]:  # a repeated prompt: copy its prefilled pages
                self.cache.copy(prefilled[index], slot, length)
        self.next_position += lengths
        # Row r of the passes' logits is distinct prompt passed[r]'s.
        passed = [index for group in groups for index in group]
        row_of = {index: row for row, index in enumerate(passed)}
        rows = torch.tensor([row_of[index] for index in order], device=self.device)
        new_logits = torch.cat(last)[rows]
        self.logits = new_logits if len(self.logits) == 0 else torch.cat([self.logits, new_logits])
        return lengths

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """``prompts`` into their ``slots``: one pass, or one per piece of a
        prompt too long for one. Returns each one's last logits."""
        if len(prompts) == 1 and not one_pass_holds(1, len(prompts[0]), self.prefill_area):
            *earlier, last = prefill_pieces(len(prompts[0]), self.prefill_area)
            for start, end in earlier:
                self._piece(prompts[0], start, end, slots)
            return self._piece(prompts[0], *last, slots)
        ids, mask = encode(prompts, self.pad, self.device)
        places = (mask.cumsum(-1) - 1).masked_fill(mask == 0, self.cache.scratch_position)
        return self._pass(ids, places, slots, columns=ids.shape[1])

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
        free = len(self.cache.free)
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
