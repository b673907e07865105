"""A walkthrough-style server, kept only as the benchmark's baseline.

Like the walkthrough's app: each HTTP request runs its own ``model.generate``
call, with no batching across requests. It shares the ingress, validation and
replica settings with the real app, so the benchmark isolates batching.
"""

import asyncio
from collections.abc import AsyncIterator

from helpers.config import ServeConfig
from helpers.engine import Completion, Engine, Sampling
from helpers.llm_server import Prompt, TextDelta


class OneByOneServer:
    """Same interface as LLMServer; one ``generate()`` per prompt, one at a time."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine = Engine(
            config.model_id, config.model_cache_dir, cpu_threads=config.torch_threads
        )
        self._lock = asyncio.Lock()

    async def stream(
        self, prompts: list[Prompt], sampling: Sampling, text: bool = True
    ) -> AsyncIterator[list[TextDelta]]:
        """LLMServer's interface: an acceptance, then each prompt's completion
        in one piece once its ``generate`` call has finished."""
        yield []
        for index, prompt in enumerate(prompts):
            async with self._lock:
                completion = await asyncio.to_thread(
                    self._generate_one,
                    prompt.text,
                    sampling.max_new_tokens,
                    sampling.temperature,
                    sampling.top_p,
                )
            yield [TextDelta(index, completion.text if text else "", completion)]

    def _generate_one(
        self, prompt: str, max_new_tokens: int, temperature: float, top_p: float
    ) -> Completion:
        import torch

        tokenizer, model = self.engine.tokenizer, self.engine.model
        text = self.engine.format_prompt(prompt, self.config.prompt_format)
        inputs = tokenizer(text, return_tensors="pt")
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
