"""The model deployment: owns one :class:`Engine` and batches requests into it.

Replicas of this deployment are the expensive part (a model in memory, CPU or
GPU reserved), so they scale between ``MIN_REPLICAS`` (default 0) and
``MAX_REPLICAS``. Only the ingress calls them, and only for real work: a
health probe never lands here, so it cannot keep a replica awake.

Batching: every prompt, from one request or many, is submitted to the
engine's continuous batcher, which decodes all prompts in flight together and
lets new ones join at the next token. On CPU this is the largest lever there
is: sixteen sequences decoded together give several times the tokens per
second of sixteen decoded one after another.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from helpers.config import ServeConfig
from helpers.engine import Completion, Engine, GenerationRequest


class LLMServer:
    """Serve deployment class; options are applied in :mod:`helpers.serve_app`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine = Engine(
            config.model_id,
            config.model_cache_dir,
            want_gpu=config.num_gpus_per_replica > 0,
            cpu_threads=config.torch_threads,
            max_batch_size=config.max_batch_size,
        )

    async def generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float
    ) -> list[Completion]:
        """Complete every prompt; the prompts join the batch being decoded.

        Raises PromptTooLongError before any work starts if one prompt does not
        fit, so a bad prompt never fails a batch shared with other requests.
        """
        requests = [
            GenerationRequest(
                prompt=self.engine.format_prompt(prompt, self.config.prompt_format),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
            )
            for prompt in prompts
        ]
        for request in requests:
            self.engine.check_fits(request)
        # The engine decodes on its own thread; awaiting its futures keeps this
        # replica's event loop free, and a cancelled request (client gone)
        # cancels its futures, which drops those rows at the next token.
        futures = [asyncio.wrap_future(self.engine.submit(r)) for r in requests]
        return list(await asyncio.gather(*futures))

    def batch_stats(self) -> dict[str, int]:
        """Batching counters of this replica, for tests and curious users."""
        return asdict(self.engine.stats)
