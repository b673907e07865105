"""The padded layout of the running batch (CPU, and transformers' models
anywhere): a growing, left-padded KV cache, its rows kept in groups of about
one length, and, with the kit's Llama, prompts that go in a piece per decode
step (:mod:`helpers.engine.batch_rows` says what both layouts share).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from helpers.engine.batch_rows import distinct, encode
from helpers.engine.decoder import Decoder, Segment, SegmentDecoder
from helpers.engine.prefix_cache import Prefix, PrefixCache

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
running rows' decode step (the batcher's budget for :class:`Prefill` pieces)
where an Engine is built without one, as benches and tests do: a serving
replica passes ``PREFILL_CHUNK_TOKENS``, which by default follows its
threads (:attr:`helpers.config.ServeConfig.prefill_chunk`)."""


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
    by their size instead: :func:`helpers.engine.paged_rows.prefill_groups`.)

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

    With the kit's Llama and a ``prefix_budget`` in bytes, what ended rows
    held is kept (:meth:`remember`), and a prompt that starts as one of them
    did goes in from where the two part (:mod:`helpers.engine.prefix_cache`).
    """

    max_positions = None
    """No limit of its own on a sequence's length."""
    prefill_passes = 1
    """Forward passes the last ``admit`` ran: always one here."""

    def __init__(
        self, model: Decoder, tokenizer: Any, groups: int = ROW_GROUPS, prefix_budget: int = 0
    ) -> None:
        if groups < 1:
            raise ValueError(f"groups must be at least 1, not {groups}")
        self.model = model
        self.pad = tokenizer.pad_token_id or 0
        self.cached_tokens: list[int] = []  # see admit
        self.folds_prefills = isinstance(model, SegmentDecoder)
        self.max_groups = groups if self.folds_prefills else 1
        self.prefixes = (
            PrefixCache(prefix_budget) if self.folds_prefills and prefix_budget > 0 else None
        )
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
        may reach, matters only to the paged layout, which holds room for it.
        Should it raise, the running rows are as they were (both layouts
        promise it). Nothing kept is reused here: prompts that may start as
        an ended row did go through :meth:`prefills_by_length`."""
        prefill = self.prefill(prompts)
        self.decode([], [(prefill, prefill.left)], may_insert=False)
        assert prefill.lengths is not None  # its one piece was its last
        self.cached_tokens = [0] * len(prompts)
        return prefill.lengths

    def prefills_by_length(self, prompts: list[list[int]]) -> list[tuple[list[int], Prefill]]:
        """``prompts`` admitted together, made ready to be prefilled: each
        group's indices among them and its :class:`Prefill`, fewest columns
        to prefill first. Those that reuse nothing go in groups of about one
        length, no more groups than the rows keep (:func:`length_groups`;
        with one row group, one prefill for all of them). A prompt that
        starts as an ended row did is a prefill of its own (with its copies,
        a request's ``n`` choices), from where the two part, so a burst of
        questions after one system prompt is a prefill per question, each
        joining the rows by itself."""
        reused = self._reused(prompts)
        fresh = [index for index in range(len(prompts)) if index not in reused]
        groups = length_groups([len(prompts[i]) for i in fresh], self.max_groups)
        made = [([fresh[i] for i in group], None) for group in groups]
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for index in reused:
            by_prompt.setdefault(tuple(prompts[index]), []).append(index)
        made += [(group, reused[group[0]]) for group in by_prompt.values()]
        prefills = [
            (group, self.prefill([prompts[i] for i in group], prefix)) for group, prefix in made
        ]
        return sorted(prefills, key=lambda made: made[1].left)

    def _reused(self, prompts: list[list[int]]) -> dict[int, Prefix]:
        """The prompts that start as an ended row did, by index: what of
        them is computed already."""
        if self.prefixes is None:
            return {}
        found: dict[tuple[int, ...], Prefix | None] = {}
        for prompt in prompts:
            if tuple(prompt) not in found:
                found[tuple(prompt)] = self.prefixes.longest(prompt)
        return {
            index: prefix
            for index, prompt in enumerate(prompts)
            if (prefix := found[tuple(prompt)]) is not None
        }

    def prefill(self, prompts: list[list[int]], prefix: Prefix | None = None) -> Prefill:
        """``prompts`` (token ids) made ready to be prefilled piece by piece
        (:meth:`decode`), in a cache of their own until the last piece; with
        a ``prefix`` (copies of one prompt only), from its end."""
        unique, order = distinct(prompts)
        ids, mask, places = self._encode(unique)
        cache = self.model.new_cache()
        if prefix is None:
            return Prefill(ids, mask, places, order, cache)
        assert len(unique) == 1, "a prefix is one prompt's"
        for layer, (keys, values) in zip(cache.layers, prefix.layers, strict=True):
            layer.keys, layer.values = keys, values
        return Prefill(ids, mask, places, order, cache, start=prefix.tokens)

    def remember(self, rows: list[tuple[int, list[int]]]) -> None:
        """Keep what each ended row, given with the tokens it was fed (its
        prompt, then its output), holds in its cache: the columns its mask
        counts, which are the last of its group's."""
        if self.prefixes is None:
            return
        for row, tokens in rows:
            group, index = self._group_of(row)
            held = int(group.mask[index].sum())
            mine = slice(index, index + 1)
            layers = [
                (layer.keys[mine, :, -held:], layer.values[mine, :, -held:])
                for layer in group.cache.layers
            ]
            self.prefixes.remember(tokens[:held], layers)

    def _group_of(self, row: int) -> tuple[RowGroup, int]:
        """The group holding ``row``, and its index there."""
        for group in self.groups:
            if row < group.rows:
                return group, row
            row -= group.rows
        raise IndexError(f"no row {row} among {self.rows}")

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
        start: int = 0,
    ) -> None:
        """``start``: columns ``cache`` holds already (a prefix kept from an
        ended row)."""
        self.ids, self.mask, self.positions = ids, mask, positions
        self.order = order  # each prompt's distinct row (see distinct)
        self.cache = cache
        self.start = start
        self.done = start
        """Columns in the cache so far."""
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
        """Columns it prefills in all: its longest prompt's tokens, less
        those it started with."""
        return self.ids.shape[1] - self.start

    @property
    def left(self) -> int:
        """Columns not yet prefilled."""
        return self.ids.shape[1] - self.done

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
