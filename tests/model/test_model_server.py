"""The model replica's class on the real embedded model, without Ray: what
happens to the engine's work when a caller goes away."""

import asyncio
import time

from helpers.config import ServeConfig
from helpers.protocol import Prompt, Sampling
from helpers.serve.model_server import LLMServer


def test_a_stream_closed_as_soon_as_it_is_accepted_leaves_nothing_decoding() -> None:
    """The ingress closes the stream when its client leaves, possibly right
    after the replica accepted the request: the prompt must not decode on,
    for nobody, to its last token."""
    server = LLMServer(ServeConfig.from_env({"LLM_METRICS": "off", "SPARE_WORKER": "off"}))
    stats = server.engine.stats
    cancelled_before = stats.cancelled

    async def accept_then_leave() -> None:
        stream = server.stream([Prompt("Tell a long story.")], Sampling(256, 0.0, 1.0))
        assert await anext(stream) == []  # accepted
        await stream.aclose()

    asyncio.run(accept_then_leave())
    deadline = time.monotonic() + 60
    while stats.cancelled == cancelled_before:
        assert time.monotonic() < deadline, "the prompt decoded on after its stream closed"
        time.sleep(0.02)
    assert stats.generated_tokens < 256
