"""Two model replicas on a real local Ray cluster, each keeping its own prefix
cache: a chat's every turn reaches the one that ran the turn before
(``helpers.serve.prefix_routing``), so each turn finds the whole of the
last in the cache. With Serve's default router a turn lands on the other
replica half of the time, and this module's six turns would all land right
once in 32 runs."""

import os
import uuid
from collections.abc import Iterator

import openai
import pytest

from helpers.config import ServeConfig
from helpers.notebook.polling import wait_for

from .conftest import BASE_URL, model_replicas_running

TURNS = 6


@pytest.fixture(scope="module")
def test_config() -> ServeConfig:
    """Two replicas from the start, one CPU each: the whole test cluster."""
    return ServeConfig.from_env(
        {**os.environ, "MIN_REPLICAS": "2", "MAX_REPLICAS": "2", "MAX_NEW_TOKENS": "16"}
    )


@pytest.fixture(scope="module")
def client(deployed_app: ServeConfig) -> Iterator[openai.OpenAI]:
    wait_for(lambda: model_replicas_running() == 2, timeout_s=300, what="two model replicas")
    with openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", timeout=120) as made:
        yield made


def test_a_chats_every_turn_finds_the_turn_before_in_its_replicas_cache(
    client: openai.OpenAI, deployed_app: ServeConfig
) -> None:
    system = f"Answer in one short sentence. {uuid.uuid4()} " * 6
    messages = [{"role": "system", "content": system}]
    previous_prompt = 0
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Name {turn + 2} colours."})
        reply = client.chat.completions.create(
            model=deployed_app.model_id, messages=messages, max_tokens=8, temperature=0
        )
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert cached >= previous_prompt, f"turn {turn + 1} met a cache without the turn before"
        previous_prompt = reply.usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
