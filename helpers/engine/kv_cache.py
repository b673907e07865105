"""Where each layer's keys and values wait between forward passes.

Two layouts, because the CPU and the GPU are bound by different things:
:class:`KVCache` grows by a column a step and reserves nothing, for a CPU
where arithmetic is the cost; :class:`PagedCache` keeps fixed shapes and
addresses, so a GPU can replay a decode step as one CUDA graph. Both keep
per-layer ``keys`` and ``values`` as transformers' caches do, so the batcher
drives either model the same way. They live apart from the model because the
batch layouts (:mod:`helpers.engine.batch_rows`), the KV budget and the paged
decode kernel reason about pages without needing a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from helpers.engine.llama_config import LlamaConfig
from helpers.engine.page_index import PageIndex


class LayerCache:
    """One layer's keys and values, ``[batch, kv_heads, length, head_dim]``."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Append the new tokens' keys and values; their queries' attention
        over every column, under ``mask``."""
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return F.scaled_dot_product_attention(
            queries, self.keys, self.values, attn_mask=mask, scale=scale, enable_gqa=True
        )


class KVCache:
    """Keys and values that grow by one column per step, rows left-padded to a
    common length: what each group of the batcher's CPU rows keeps (no memory
    reserved ahead, no work spent on columns nobody reads)."""

    def __init__(self, layers: int) -> None:
        self.layers = [LayerCache() for _ in range(layers)]

    @property
    def length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[-2]

    def mask(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        new: int,
        window: int | None,
    ) -> torch.Tensor | None:
        """None on CPU where every row's one new token sees every key (no
        padding, within the window): attention then skips applying a mask,
        the same result to the bit for less work a layer. A GPU keeps its
        mask: the check would wait for the device, and attention there may
        pick another kernel without one."""
        if (
            new == 1
            and position_ids.device.type == "cpu"
            and (window is None or self.length < window)
            and (attention_mask is None or bool(attention_mask.all()))
        ):
            return None
        if attention_mask is None:
            batch = position_ids.shape[0]
            attention_mask = torch.ones(
                batch, self.length + new, dtype=torch.long, device=position_ids.device
            )
        return _attention_mask(attention_mask, new, window)


def _attention_mask(mask: torch.Tensor, new: int, window: int | None) -> torch.Tensor:
    """Which keys each new token may attend to, ``[batch, 1, new, length]``:
    earlier real tokens and itself (the latest ``window`` of them). Rows are
    padded on the left only, so a row's real tokens lie in consecutive
    columns and a distance in columns is one in positions.

    A padding token sees only itself, so no row of the attention is empty:
    an empty row gives NaN, which its cached values would then carry into
    every real token's attention (0 weight times NaN is NaN).
    """
    length = mask.shape[1]
    queries = torch.arange(length - new, length, device=mask.device)[:, None]
    keys = torch.arange(length, device=mask.device)[None, :]
    causal = keys <= queries
    if window is not None:
        causal &= keys > queries - window
    allowed = causal[None] & mask[:, None, :].bool()
    return (allowed | (keys == queries)[None])[:, None]


PAGE_SIZE = 16
"""Positions one page of a :class:`PagedCache` holds."""


def pages_for(positions: int) -> int:
    """Pages that hold ``positions`` positions."""
    return -(-positions // PAGE_SIZE)


class PagedLayer:
    """One layer's pages of a :class:`PagedCache`, ``[pages, PAGE_SIZE, kv_heads, head_dim]``."""

    def __init__(self, owner: PagedCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.owner, self.keys, self.values = owner, keys, values

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Write the new tokens into their pages, then attend: in place, with
        the cache's decode kernel, for a pass of one new token a row
        (:meth:`PagedCache.select`); else over the rows' pages gathered in
        order, under ``mask``."""
        owner = self.owner
        # [batch, new] page and offset indices around all heads: the indexed
        # view is [batch, new, heads, head_dim].
        self.keys[owner.write_pages, owner.write_offsets] = keys.transpose(1, 2)
        self.values[owner.write_pages, owner.write_offsets] = values.transpose(1, 2)
        if owner.ends is not None:
            return owner.decode_kernel(
                queries, self.keys, self.values, owner.read_pages, owner.ends, scale, owner.window
            )
        keys, values = (
            _gathered(self.keys, owner.read_pages),
            _gathered(self.values, owner.read_pages),
        )
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )


def _gathered(pool: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, width, head_dim]`` from a layer's pages and each row's
    page numbers, ``[batch, width / PAGE_SIZE]``."""
    rows = pool[pages]  # [batch, pages, PAGE_SIZE, heads, head_dim], one copy
    return rows.view(pages.shape[0], -1, *pool.shape[2:]).transpose(1, 2)


DecodeKernel = Callable[..., torch.Tensor]
""":func:`helpers.engine.paged_attention.decode_attention`'s signature."""


class PagedCache:
    """Keys and values in pages of ``PAGE_SIZE`` positions shared by every
    sequence; each sequence owns a row ("slot") of a block table that lists
    its pages, so its token at position p lives at offset p % PAGE_SIZE of
    page ``table[slot, p // PAGE_SIZE]``.

    Why: on a GPU a decode step of a small model is launch-bound (a thousand
    small kernels), and replaying it as one CUDA graph needs every tensor's
    shape and address fixed in advance. The pages and the table keep both
    fixed while each sequence holds only the pages its own length needs: a
    cache of one row per sequence, each as long as the longest, would
    reserve the worst case for all of them. A pass of one new token a row (a
    decode step) reads each row's pages in place, up to its own position,
    with ``decode_kernel`` where the cache is given one (a GPU's kernel of
    :mod:`helpers.engine.paged_attention`, which whoever builds the model
    chooses: :func:`helpers.engine.kernel_choice.paged_decode_kernel`);
    otherwise, and in prefills, each row's pages are gathered in order and
    read under a mask of the positions up to each token's own. Either way
    the caller passes no attention mask.

    Page 0 is scratch. A table's unused entries point at it, and so does its
    last column: a padding token is placed at ``scratch_position``, whose
    write lands there. Whatever it holds is read only under the mask.

    A full page may sit in several rows at once: ``kept``
    (:class:`helpers.engine.page_index.PageIndex`) knows the pages whose
    tokens are written, and a prompt that starts with those tokens gets
    them in its row rather than new ones (:meth:`assign`). ``holders``
    counts the rows a page is in; at none it goes back to the free list, or
    stays idle in ``kept`` until a new sequence needs it.

    Before each forward pass the caller names its rows, their tokens'
    positions and the columns attention reads (:meth:`select`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        slots: int,
        pages: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
        decode_kernel: DecodeKernel | None = None,
    ) -> None:
        self.dtype, self.device = dtype, device
        self.window = config.sliding_window
        self.decode_kernel = decode_kernel
        self.ends: torch.Tensor | None = None  # where the kernel stops, row by row
        self.page_shape = (PAGE_SIZE, config.num_key_value_heads, config.head_dim)
        self.layers = [
            PagedLayer(self, *self._new_pool(pages)) for _ in range(config.num_hidden_layers)
        ]
        columns = pages_for(max_positions)
        self.scratch_position = columns * PAGE_SIZE
        self.table = torch.zeros(slots, columns + 1, dtype=torch.long, device=device)
        self.free = list(range(1, pages + 1))
        self.owned: dict[int, list[int]] = {}  # slot -> its pages, in order
        self.holders: dict[int, int] = {}  # page -> how many slots hold it
        self.kept = PageIndex(PAGE_SIZE)

    def _new_pool(self, pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (pages + 1, *self.page_shape)
        return (
            torch.zeros(shape, dtype=self.dtype, device=self.device),
            torch.zeros(shape, dtype=self.dtype, device=self.device),
        )

    @property
    def pages(self) -> int:
        """Pages for sequences, scratch not counted."""
        return self.layers[0].keys.shape[0] - 1

    def select(self, rows: torch.Tensor, positions: torch.Tensor, width: int) -> None:
        """Set the next pass: its ``rows`` (slots), each token's position
        (``[rows, new]``) and the columns attention reads, a multiple of
        ``PAGE_SIZE``. Tensor arithmetic only, so a CUDA graph captures it."""
        self.ends = None
        if positions.shape[1] == 1 and self.decode_kernel is not None:
            # The kernel reads this pass's pages: each row up to its new token,
            # or, for an idle row (at scratch), scratch's first column, which
            # keeps its unused output finite.
            last = positions[:, 0]
            self.ends = torch.where(last >= self.scratch_position, 1, last + 1).int()
        self.write_pages = self.table[rows[:, None], positions // PAGE_SIZE]
        self.write_offsets = positions % PAGE_SIZE
        self.read_pages = self.table[rows, : width // PAGE_SIZE]
        self.width = width

    @property
    def available(self) -> int:
        """Pages a new sequence can have: the free ones, and the idle ones
        kept for prompts that start as their sequences did."""
        return len(self.free) + self.kept.idle

    def assign(
        self, slots: list[int], positions: list[int], starts: dict[int, list[int]] | None = None
    ) -> None:
        """Give each slot pages for that many positions: first the kept pages
        ``starts`` names for it, if any (shared, not written), then zeroed
        ones. Zeroed, as the mask gives a column weight zero, but zero times
        a NaN left by the last owner is NaN."""
        starts = starts or {}
        for pages in starts.values():  # held before any is taken back for the rest
            self._hold(pages)
        table = torch.zeros(len(slots), self.table.shape[1], dtype=torch.long)
        taken: list[int] = []
        for row, (slot, count) in enumerate(zip(slots, positions, strict=True)):
            shared = starts.get(slot, [])
            needed = pages_for(count) - len(shared)
            if needed > self.available:
                for unassigned in slots[row:]:
                    self._release(starts.get(unassigned, []))
                raise ValueError(f"{count} positions need {needed} pages; {self.available} free")
            self.owned[slot] = [*shared, *self._take(needed)]
            table[row, : len(self.owned[slot])] = torch.tensor(self.owned[slot])
            taken += self.owned[slot][len(shared) :]
        self.table[torch.tensor(slots, device=self.device)] = table.to(self.device)
        pages = torch.tensor(taken, device=self.device)
        for layer in self.layers:
            layer.keys[pages] = 0
            layer.values[pages] = 0

    def remember(self, slot: int, tokens: Sequence[int]) -> None:
        """Index ``slot``'s full pages as holding ``tokens``, every one of
        which it has written: a later prompt that starts the same way reads
        them (:meth:`assign`'s ``starts``)."""
        self.kept.add(tokens, self.owned[slot])

    def _take(self, count: int) -> list[int]:
        """``count`` pages no slot holds: free ones first, then idle kept ones,
        least recently used first, which are unindexed."""
        while len(self.free) < count:
            self.free += self.kept.take()
        taken, self.free = self.free[:count], self.free[count:]
        self._hold(taken)
        return taken

    def _hold(self, pages: list[int]) -> None:
        for page in pages:
            self.holders[page] = self.holders.get(page, 0) + 1
            self.kept.held(page)

    def _release(self, pages: list[int]) -> None:
        """A slot's pages given up, its last first: a kept page no slot holds
        any more is idle, and a sequence's later pages, which fewer prompts
        share, are the first taken back."""
        for page in reversed(pages):
            self.holders[page] -= 1
            if self.holders[page] == 0:
                del self.holders[page]
                if page in self.kept:
                    self.kept.released(page)
                else:
                    self.free.append(page)

    def keep(self, slots: list[int]) -> None:
        """Keep these slots' sequences, renumbered 0, 1, ... in this order, and
        give up every other slot's pages (to the free list, or idle in
        ``kept`` where they are indexed); the table's other rows point at
        scratch again.

        Why renumber: a decode step runs over the table's first rows, as many
        as the last busy one needs, so the sequences left after others end
        are packed at the front and the step shrinks with them. A sequence
        moves by its row of the table; its pages stay where they are."""
        busy = max(self.owned, default=-1) + 1
        kept = set(slots)
        for slot in [slot for slot in self.owned if slot not in kept]:
            self._release(self.owned.pop(slot))
        self.owned = {row: self.owned[slot] for row, slot in enumerate(slots)}
        if slots != list(range(len(slots))):
            self.table[: len(slots)] = self.table[torch.tensor(slots, device=self.device)]
        self.table[len(slots) : busy] = 0

    def copy(self, source: int, target: int, positions: int) -> None:
        """Copy the first ``positions`` positions of one slot's pages to
        another's, but for the pages both hold (a kept start they share)."""
        count = pages_for(positions)
        both = zip(self.owned[source][:count], self.owned[target][:count], strict=True)
        pairs = [(mine, theirs) for mine, theirs in both if mine != theirs]
        source_pages = torch.tensor([mine for mine, _ in pairs], device=self.device)
        target_pages = torch.tensor([theirs for _, theirs in pairs], device=self.device)
        for layer in self.layers:
            layer.keys[target_pages] = layer.keys[source_pages]
            layer.values[target_pages] = layer.values[source_pages]

    def grow(self, pages: int) -> None:
        """Room for ``pages`` pages in all, their contents kept. The layers'
        tensors move: CUDA graphs captured over the old ones must go."""
        kept = self.pages + 1
        for layer in self.layers:
            keys, values = self._new_pool(pages)
            keys[:kept], values[:kept] = layer.keys, layer.values
            layer.keys, layer.values = keys, values
        self.free += list(range(kept, pages + 1))

    def mask(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        new: int,
        window: int | None,
    ) -> torch.Tensor | None:
        """``[batch, 1, new, width]``: columns up to each token's own position
        and within ``window`` of it. A padding token (at ``scratch_position``)
        sees every column, so its row of attention is never empty: an empty
        row gives NaN, which its write would leave in the scratch page that
        every row reads under its mask (and zero times NaN is NaN).

        None where the decode kernel reads this pass's pages itself (one new
        token a row, :meth:`select`)."""
        if self.ends is not None:
            return None
        columns = torch.arange(self.width, device=position_ids.device)
        positions = position_ids[:, :, None]
        allowed = columns <= positions
        if window is not None:
            allowed &= (columns > positions - window) | (positions >= self.scratch_position)
        return allowed[:, None]
