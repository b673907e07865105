"""Choosing the next token for one sequence, with its own parameters and seed."""

from __future__ import annotations

from typing import Protocol

import torch


class SamplingParams(Protocol):
    temperature: float
    top_p: float
    seed: int | None


class Sampler:
    """Greedy at temperature 0, else nucleus (top-p) sampling.

    Each sequence has its own sampler, so a seeded request draws the same
    tokens whatever else shares its batch.
    """

    def __init__(self, request: SamplingParams, device: str) -> None:
        self.temperature = request.temperature
        self.top_p = request.top_p
        self.generator: torch.Generator | None = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
