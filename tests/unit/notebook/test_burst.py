"""Unit tests for helpers.notebook.burst against the fake ingress on 127.0.0.1."""

from __future__ import annotations

import pytest

from helpers.notebook.burst import Burst
from helpers.notebook.client import ApiError, LLMClient
from helpers.notebook.polling import wait_for
from tests.unit.notebook.fake_ingress import FakeServer

SENDERS = 3


def test_a_burst_keeps_sending_until_the_block_ends_and_keeps_every_answer(
    server: FakeServer,
) -> None:
    with Burst(LLMClient(server.url), SENDERS, max_new_tokens=4) as burst:
        # Three times as many answers as senders: each sender sent again.
        wait_for(lambda: len(burst.replies) >= 3 * SENDERS, 30, "the senders to send again", 0.05)
    assert not burst.errors
    assert len(burst.replies) == len(server.received), "a request sent was not answered"
    prompts = [reply.prompt for reply in burst.replies]
    assert len(set(prompts)) == len(prompts), "two requests had the same prompt"
    assert all(body["generation_kwargs"] == {"max_new_tokens": 4} for body in server.received)


def test_a_refused_request_ends_its_sender_and_is_kept(server: FakeServer) -> None:
    with Burst(LLMClient(server.url), SENDERS, prompt="bad") as burst:
        wait_for(lambda: len(burst.errors) == SENDERS, 30, "every sender to be refused", 0.05)
    assert len(server.received) == SENDERS, "a sender sent again after it was refused"
    assert not burst.replies
    assert all(isinstance(err, ApiError) and err.status == 400 for err in burst.errors)


def test_an_interrupted_burst_returns_without_waiting_for_its_answers(server: FakeServer) -> None:
    burst = Burst(LLMClient(server.url), SENDERS, prompt="hold")
    with pytest.raises(KeyboardInterrupt), burst:
        wait_for(lambda: len(server.received) == SENDERS, 30, "every sender to send", 0.05)
        raise KeyboardInterrupt  # as a user stopping the cell
    # Had the block waited, the held requests would have ended (refused after
    # the server's hold) before it returned.
    assert not burst.replies and not burst.errors, "the block waited for its answers"
    server.release.set()
    wait_for(lambda: len(burst.replies) == SENDERS, 30, "the held requests' answers", 0.05)
    assert len(server.received) == SENDERS, "a sender sent again after the interrupt"
