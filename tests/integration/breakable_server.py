"""The real model deployment plus ways to break it, for the fault tests.

Only the tests call ``break_the_model``, ``stop_decoding``, ``stall_decoding``
and ``resume_decoding``; ``check_health`` and everything else are LLMServer's
own. The test registers this module to be pickled by value, so replicas need
not import anything from ``tests``.
"""

import asyncio
import threading

import torch

from helpers.protocol import Sampling
from helpers.serve.model_server import LLMServer

STALL_LIMIT_S = 120.0
"""The longest a stall lasts without ``resume_decoding``, so a test that
failed before releasing it leaves a replica that recovers."""


class BreakableLLMServer(LLMServer):
    def break_the_model(self) -> None:
        """Poison the embeddings, as a corrupted weight or a failed device would."""
        with torch.no_grad():
            self.engine.model.model.embed_tokens.weight.fill_(float("nan"))

    def stop_decoding(self) -> None:
        """End the engine's decode loop, as a bug outside any one batch does:
        the replica refuses every request until its health check fails."""
        self.engine.close()

    async def stall_decoding(self) -> None:
        """Hold the engine's decode loop until :meth:`resume_decoding`; returns
        once it is held. Requests are still accepted, and wait in the queue
        without a token decoded, so a test of what happens to a slow
        generation (a timeout) need not outrun the model.

        The hold is a chore of the batcher's, run on the decode thread between
        two steps, which waits. A loop asleep runs chores only after a
        request's step, so a one-token request of its own wakes it; once that
        request ends, the idle loop runs every chore queued, the hold last.
        """
        resume, held = threading.Event(), threading.Event()
        self._resume = resume

        def hold() -> None:
            held.set()
            resume.wait(STALL_LIMIT_S)

        self.engine.between_steps([hold])
        wake = Sampling(max_new_tokens=1, temperature=0.0, top_p=1.0)
        await asyncio.wrap_future(self.engine.submit(self.engine.request("a", wake)))
        if not await asyncio.to_thread(held.wait, 60):
            raise RuntimeError("the decode loop was not held within 60 s")

    def resume_decoding(self) -> None:
        """Let the decode loop held by :meth:`stall_decoding` go on."""
        self._resume.set()
