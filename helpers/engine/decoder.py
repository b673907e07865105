"""The contract between the continuous batcher and the models it drives.

A model family joins the kit by meeting :class:`Decoder`: the batch layouts
(:mod:`helpers.engine.batch_rows`) ask nothing else of it. Two more abilities
make a model faster where it has them, and are asked for by type: folding
new prompts into a decode step's pass (:class:`SegmentDecoder`), and a paged
cache whose steps replay as CUDA graphs (:class:`SlotDecoder`). The kit's own
Llama (:mod:`helpers.engine.llama`) has both; a transformers causal LM meets
:class:`Decoder` through :class:`TransformersDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from helpers.engine.kv_cache import KVCache, PagedCache


class Decoder(Protocol):
    """A causal language model the batcher can drive, row by row."""

    config: Any
    generation_config: Any

    @property
    def device(self) -> torch.device: ...

    def new_cache(self) -> Any:
        """An empty KV cache for a batch of new rows; the batch layouts keep
        each layer's ``keys`` and ``values`` (``cache.layers``) in step."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> Any:
        """An output whose ``logits`` are ``[batch, kept tokens, vocab]``, the
        cache extended by ``input_ids``. ``attention_mask`` covers the cached
        tokens and the new ones (0 marks left padding); ``position_ids`` count
        each row's real tokens only."""
        ...


@dataclass(frozen=True)
class Segment:
    """Rows that share a cache and a token count, for one forward pass.

    A decode step is one segment (one new token per row); so is a prefill
    (each prompt's tokens, left-padded). A :class:`SegmentDecoder` runs
    several in one pass (the kit's own:
    :meth:`helpers.engine.llama.Llama.forward_segments`): every linear layer,
    where nearly all of a CPU forward pass goes, reads its weights once for
    all their tokens, and only attention runs per segment, each against its
    own cache.
    """

    input_ids: torch.Tensor
    cache: KVCache | PagedCache
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    logits_to_keep: int = 0
    """Logits for this many last tokens of each row; 0 for every token."""


@runtime_checkable
class SegmentDecoder(Decoder, Protocol):
    """Runs several segments (a decode step, a prefill) in one pass, so a
    prompt that arrives mid-batch rides along the running rows' next step."""

    def forward_segments(self, segments: list[Segment]) -> list[torch.Tensor]: ...


@runtime_checkable
class SlotDecoder(Decoder, Protocol):
    """Keeps each sequence in a slot of a paged cache, so a decode step has
    fixed shapes and addresses and replays as a CUDA graph."""

    def new_paged_cache(self, slots: int, pages: int, max_positions: int) -> Any: ...


class TransformersDecoder(nn.Module):
    """A transformers causal LM behind :class:`Decoder`: its cache is
    transformers' ``DynamicCache``, and it is always asked to fill it."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> Any:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
