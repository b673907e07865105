"""What the running batch's two layouts share: the batch's tensors (KV cache,
positions, last logits) are kept one of two ways, one row per sequence, in the
continuous batcher's row order (:mod:`helpers.engine.batcher` decides which
sequences run; a layout holds their tensors and runs the model over them):

- :class:`~helpers.engine.padded_rows.PaddedRows`, on CPU and for
  transformers' models: the cache grows by one column per step and rows are
  left-padded to a common length within groups of rows of about one length.
  No memory is reserved ahead and no arithmetic is spent on columns nobody
  reads, which is what matters where the arithmetic is the cost.
- :class:`~helpers.engine.paged_rows.PagedRows`, for the kit's own Llama on a
  GPU: each sequence owns a row ("slot") of a paged cache's block table and
  the pages it lists, so every decode step has the same shapes and addresses
  and is replayed as one CUDA graph, while each sequence holds pages for its
  own prompt and ``max_new_tokens`` only, not for the longest sequence's
  length. A small model's decode step is a thousand small kernels, and
  launching them one by one from Python costs far more than running them.

Both take the same calls: how many waiting sequences have room
(``fitting``), ``admit`` prompts (one prefill pass for all of them, or a few
for many or very long ones: ``prefill_passes``; the positions of each
found kept from an earlier sequence: ``cached_tokens``), ``keep`` some
rows, ``decode`` one token per row (whether it returns before the step has
run: ``step_runs_ahead``), ``clear``, and ``remember`` rows that ended, for
prompts that start as they did. Where ``folds_prefills``, prompts can
instead go in a piece per decode step (``prefill``, then ``decode(tokens,
pieces)``). ``logits`` holds each row's last logits after ``admit`` and
``decode``; ``keep`` leaves it stale, since the batcher always decodes
next.
"""

from __future__ import annotations

import torch


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
