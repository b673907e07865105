"""Choosing the next token for one sequence, with its own settings and seed.

The order is vLLM's (its v1 sampler), so a client moving between the two
gets the same distribution for the same settings: ``logit_bias`` is added
first, then the logits are changed by what this sequence did
(``repetition_penalty`` over the prompt and the completion,
``presence_penalty`` and ``frequency_penalty`` over the completion, as
OpenAI defines them); a grammar (structured output) then refuses what it
cannot take; then greedy takes the argmax, or sampling divides by the
temperature, drops the tokens less likely than ``min_p`` times the
likeliest, and keeps the ``top_k`` tokens and the ``top_p`` nucleus of
what is left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from helpers.engine.grammar import TokenConstraint
from helpers.protocol import Sampling

GREEDY_BELOW = 1e-5
"""Temperatures under this are greedy, as in vLLM: dividing fp32 logits by a
smaller one overflows them, and what it would sample is the argmax anyway."""


class Sampler:
    """One sequence's token picker. Each sequence has its own, with its own
    generator, so a seeded request draws the same tokens whatever else shares
    its batch."""

    def __init__(
        self,
        sampling: Sampling,
        device: str | torch.device,
        prompt_ids: Sequence[int],
        constraint: TokenConstraint | None = None,
    ):
        """``prompt_ids`` is used only by ``repetition_penalty``; ``constraint``
        holds the sequence to ``sampling.grammar``."""
        self.sampling = sampling
        self.constraint = constraint
        self.device = device
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self._penalized = sampling.presence_penalty != 0 or sampling.frequency_penalty != 0
        self._repetition = sampling.repetition_penalty != 1
        self._prompt_ids = list(prompt_ids) if self._repetition else []
        self._counts: torch.Tensor | None = None  # completion tokens, per vocabulary id
        self._seen: torch.Tensor | None = None  # prompt and completion tokens
        self._pending: list[int] = []  # picked, not yet in the tensors above

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature < GREEDY_BELOW

    @property
    def changes_logits(self) -> bool:
        """Whether the logits are changed before the pick: a row without it
        can take its greedy token from the whole batch's argmax."""
        return (
            self._penalized
            or self._repetition
            or bool(self.sampling.logit_bias)
            or self.constraint is not None
        )

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's fp32 logits (left unchanged)."""
        if self.changes_logits:
            logits = self._changed(logits)
        if self.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(self._probabilities(logits), 1, generator=self.generator))

    def logprobs(self, logits: torch.Tensor, token: int) -> tuple[float, list[tuple[int, float]]]:
        """``token``'s log probability under this row's logits as the model
        gave them (before any control above), and the ``logprobs``
        likeliest tokens with theirs."""
        values = torch.log_softmax(logits, dim=-1)
        count = self.sampling.logprobs or 0
        if not count:
            return float(values[token]), []
        top = torch.topk(values, count)
        return float(values[token]), list(
            zip(top.indices.tolist(), top.values.tolist(), strict=True)
        )

    def record(self, token: int) -> None:
        """Count a token the sequence produced, for the penalties."""
        if self._penalized or self._repetition:
            self._pending.append(token)

    def _changed(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        sampling = self.sampling
        for token, bias in sampling.logit_bias:
            logits[token] += bias
        if self._penalized or self._repetition:
            self._catch_up(logits.shape[-1])
        if self._repetition and self._seen is not None:
            seen = logits[self._seen]
            penalty = sampling.repetition_penalty
            logits[self._seen] = torch.where(seen > 0, seen / penalty, seen * penalty)
        if self._penalized and self._counts is not None:
            logits -= sampling.frequency_penalty * self._counts
            logits -= sampling.presence_penalty * (self._counts > 0).float()
        if self.constraint is not None:
            self.constraint.apply(logits)
        return logits

    def _catch_up(self, vocabulary: int) -> None:
        """Fold the tokens picked since the last call into the count tensors."""
        if self._counts is None:
            self._counts = torch.zeros(vocabulary, device=self.device)
            self._seen = torch.zeros(vocabulary, dtype=torch.bool, device=self.device)
            self._seen[torch.tensor(self._prompt_ids, dtype=torch.long, device=self.device)] = True
        if self._pending:
            tokens = torch.tensor(self._pending, dtype=torch.long, device=self.device)
            self._counts.index_add_(0, tokens, torch.ones(len(tokens), device=self.device))
            assert self._seen is not None
            self._seen[tokens] = True
            self._pending = []

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        sampling = self.sampling
        # A logit made infinite (a repetition_penalty near zero divides by
        # it) would turn the softmax into NaN: the largest finite value keeps
        # it the likeliest by far instead.
        logits = (logits / sampling.temperature).clamp(max=torch.finfo(logits.dtype).max)
        if sampling.min_p > 0:
            # p < min_p * p_max is logit < max logit + log(min_p): no softmax needed.
            floor = logits.max() + math.log(sampling.min_p)
            logits = logits.masked_fill(logits < floor, float("-inf"))
        if 0 < sampling.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sampling.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if sampling.top_p < 1.0:
            probs = _nucleus(probs, sampling.top_p)
        return probs


NUCLEUS_FIRST_K = 64
"""How many of the likeliest tokens :func:`_nucleus` first looks for the
``top_p`` cut among; four times as many on each try that falls short."""
NUCLEUS_MAX_K = 1024
"""Past this many, :func:`_nucleus` sorts: so wide a nucleus is rare, and
a GPU's running sums over more tokens drift further from the sort's."""


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with the tokens outside the ``top_p`` nucleus zeroed, as
    :func:`_nucleus_sorted` gives it (bit for bit on a CPU), without sorting
    the vocabulary.

    The nucleus is nearly always a few tokens, and sorting every probability
    costs far more than ``topk`` of a few dozen. The ``k`` likeliest from
    ``topk`` are the sorted vector's first ``k`` values, so their running sums
    are the sort's (summed in order, as on CPU), and the cut is taken from
    them when it is the sort's cut:

    - the ``k``-th token's mass before it reaches ``top_p``, so every token
      after it is dropped too (else ``k`` grows);
    - no running sum lies within a margin of ``top_p`` that rounding, or a
      GPU's other order of summing, could cross (a few units in the last
      place of ``probs``'s type; it also keeps the tokens past ``k`` clear);
    - the cut does not part equal probabilities, where which ones are kept
      follows the order of the sort's ties.

    Anything else is left to the sort.
    """
    margin = 32 * torch.finfo(probs.dtype).eps
    k = NUCLEUS_FIRST_K
    while k <= min(NUCLEUS_MAX_K, probs.shape[-1] - 1):
        values, indices = probs.topk(k)
        before = values.cumsum(-1) - values  # the mass of the likelier tokens
        outside = before >= top_p
        if not outside[-1]:
            k *= 4
            continue
        parted = (values[1:] == values[:-1]) & (outside[1:] != outside[:-1])
        if bool(((before - top_p).abs() >= margin).all() & ~parted.any()):
            return torch.zeros_like(probs).scatter_(0, indices, values.masked_fill(outside, 0.0))
        break
    return _nucleus_sorted(probs, top_p)


def _nucleus_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The ``top_p`` rule itself: keep the smallest prefix of the sorted
    probabilities whose mass reaches ``top_p`` (always at least one token)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
