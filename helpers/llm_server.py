"""The model deployment: owns one :class:`Engine` and batches requests into it.

Replicas of this deployment are the expensive part (a model in memory, CPU or
GPU reserved), so they scale between ``MIN_REPLICAS`` (default 0) and
``MAX_REPLICAS``. Only the ingress calls them, and only for real work: a
health probe never lands here, so it cannot keep a replica awake.

Batching: each prompt enters ``_generate_batch`` on its own; ``@serve.batch``
gathers the prompts that arrive together (from one request or many) into one
list, and the engine decodes that list in one loop. On CPU this is the largest
lever there is: a batch of 16 gives about five times the tokens per second of
16 single-prompt calls.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from ray import serve
from ray.serve import metrics

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
        )
        self._generate_batch.set_max_batch_size(config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._batch_size = metrics.Histogram(
            "llm_batch_size",
            description="Prompts decoded together in one engine call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )

    async def generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float
    ) -> list[Completion]:
        """Complete every prompt; the prompts join whatever batch is forming.

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
        return list(await asyncio.gather(*(self._generate_batch(r) for r in requests)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> list[Completion]:
        self._batch_size.observe(len(requests))
        # Decoding blocks for seconds; a worker thread keeps this replica's
        # event loop free to accept the requests that form the next batch.
        return await asyncio.to_thread(self.engine.generate, requests)

    def batch_stats(self) -> dict[str, int]:
        """Batching counters of this replica, for tests and curious users."""
        return asdict(self.engine.stats)
