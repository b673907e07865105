"""A walkthrough-style server, kept only as the benchmark's baseline.

Like the walkthrough's app: each HTTP request runs its own ``model.generate``
call on transformers' model and tokenizer, with no batching across requests.
It shares the ingress, validation and replica settings with the real app, so
the benchmark isolates the engine. (Its replicas also load the app's engine,
for the prompt formatting and checks they share, so its cold start is not the
walkthrough's.)
:mod:`bench.baseline_app` is the app built with it, for ``serve run``; this
module builds nothing, so the benchmarks and its replicas import it freely.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from helpers.config import ServeConfig
from helpers.engine.engine import pick_device, resolve_model_source
from helpers.protocol import Completion, Prompt, Sampling, TextDelta
from helpers.serve.model_server import LLMServer


class OneByOneServer(LLMServer):
    """LLMServer with its batching replaced: one ``generate()`` per prompt, one
    at a time. Loading, health checks and start-up timings stay the app's."""

    def __init__(self, config: ServeConfig) -> None:
        super().__init__(config)
        self._lock = asyncio.Lock()
        self.model, self.tokenizer = walkthrough_model(config)

    async def stream(
        self, prompts: list[Prompt], sampling: Sampling, streamed: bool = True
    ) -> AsyncIterator[list[TextDelta]]:
        """LLMServer's interface: an acceptance, then each prompt's completion
        in one piece once its ``generate`` call has finished."""
        yield []
        for index, prompt in enumerate(prompts):
            async with self._lock:
                completion = await asyncio.to_thread(
                    self._generate_one,
                    prompt,
                    sampling.max_new_tokens,
                    sampling.temperature,
                    sampling.top_p,
                )
            yield [TextDelta(index, completion.text if streamed else "", completion)]

    def _generate_one(
        self, prompt: Prompt, max_new_tokens: int, temperature: float, top_p: float
    ) -> Completion:
        import torch

        tokenizer, model = self.tokenizer, self.model
        text = self._render(prompt)
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return Completion(
            text=tokenizer.decode(new_tokens, skip_special_tokens=True),
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            completion_tokens=int(new_tokens.shape[0]),
            finish_reason="length",
        )


def walkthrough_model(config: ServeConfig) -> tuple[Any, Any]:
    """The model and tokenizer as the walkthrough loads them: transformers'
    Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(config.model_id, config.model_cache_dir)
    device, dtype = pick_device(config.num_gpus_per_replica > 0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    return model.eval(), tokenizer
