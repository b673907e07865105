"""A burst of traffic that lasts until the notebook has seen what it caused.

Serve adds a replica only once the load has stayed above its target for the
upscale delay. A fixed handful of requests can all be answered before that on a
GPU, and then no second replica ever starts. So a burst here keeps the same
number of requests in flight, sending a new one as each is answered, until the
notebook leaves the ``with`` block; every request already sent is then let
finish, so none is cut off and every answer is kept.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from helpers.notebook.client import LLMClient, Reply

STORY_PROMPT = "Tell a long story about the number {}."


class Burst:
    """``concurrency`` senders, each sending its next /generate request as soon
    as its last one is answered, from ``__enter__`` until ``__exit__``."""

    def __init__(
        self, client: LLMClient, concurrency: int, prompt: str = STORY_PROMPT, **knobs: Any
    ) -> None:
        """``prompt`` is formatted with each request's number, so prompts differ
        (and no cache of answers could serve them); ``knobs`` go to every request."""
        self.client = client
        self.concurrency = concurrency
        self.prompt = prompt
        self.knobs = knobs
        self.replies: list[Reply] = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._senders: list[threading.Thread] = []

    def __enter__(self) -> Burst:
        self._senders = [
            threading.Thread(target=self._send, args=(sender,), daemon=True)
            for sender in range(self.concurrency)
        ]
        for sender in self._senders:
            sender.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Send nothing more, and wait for the answers to what was sent; not
        when the notebook was interrupted, since a user who stops a cell wants
        it back now (each sender, a daemon thread, ends after its request)."""
        self._stop.set()
        if exc_type is KeyboardInterrupt:
            return
        for sender in self._senders:
            sender.join()

    def _send(self, sender: int) -> None:
        """Send until told to stop. A refused or failed request ends this
        sender, since the ones after it would most likely fail the same way,
        and is kept in ``errors``, so a check cell sees it."""
        number = sender
        while not self._stop.is_set():
            try:
                reply = self.client.generate(self.prompt.format(number), **self.knobs)
            except Exception as err:  # kept for the check cell, not lost with the thread
                with self._lock:
                    self.errors.append(err)
                return
            with self._lock:
                self.replies.append(reply)
            number += self.concurrency
