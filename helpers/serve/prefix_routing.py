"""Which model replica takes a request: the one that last took a prompt
starting the same way, unless it is much busier than another.

Why: a replica keeps what its ended sequences computed (the prefix cache,
``PREFIX_CACHE_MB``), but only for prompts it sees itself. Serve's
default router picks the less busy of two replicas at random, so with two
replicas a chat's next turn lands where the turn before ran only half of the
time, and otherwise prefills its whole history again. This router remembers,
for the start of each prompt it routed, in pieces, which replica took it; a
new prompt goes to the replica that took the longest start it shares. Ray
Serve LLM's ``PrefixCacheAffinityRouter`` does the same for vLLM with a
prefix tree in a detached actor; here the table lives in the ingress's own
router (one ingress replica routes everything), and is bounded.

What is compared is the request as the ingress has it, before the chat
template: a chat's messages, a completion's text or its token ids. A turn's
messages start with the turn before's, so its pieces do too.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from helpers.protocol import Message, Prompt

logger = logging.getLogger(__name__)

BLOCK_CHARS = 64
"""Characters a block of a text prompt holds (token ids count as text)."""

MIN_SHARED_CHARS = 128
"""Characters a prompt must share with one a replica took before that start
draws it there, unless that earlier prompt ended where they part: about the
32 tokens a replica's prefix cache needs in common (``MIN_REUSED_TOKENS``).
A short system prompt shared by unrelated requests draws nothing, while a
chat's next turn follows its first however short that was (the reply it got
lengthens what the cache keeps)."""

MOST_KEYS = 512
"""Pieces of a prompt looked at: enough to tell conversations apart, and
cutting and hashing stop there however long the prompt."""

REMEMBERED_KEYS = 65_536
"""Keys the table remembers, the least recently routed going first: about
15 MB in the ingress when full."""

ROUTED_METHOD = "stream"
"""The model deployment's method whose calls leave something in a replica's
cache; ``tokenize`` and ``detokenize`` calls are routed as Serve routes
any, and leave the table as it was."""

IMBALANCE = 4
"""Requests by which the replica a prompt's start points to may outnumber
the least busy replica before load wins and the prompt goes elsewhere: a
replica gives a request a row of its batch at once, so a few more rows cost
it slower decode steps, while the prefill a kept start saves grows with the
conversation (decision 0041)."""


def prompt_pieces(prompt: Prompt) -> list[str]:
    """``prompt`` in at most ``MOST_KEYS`` pieces, where a conversation that
    goes on keeps the pieces it had: a chat's tools (chat templates put them
    first), then each message; a text, or its token ids, in blocks, the last
    of which may be short, and so differs from a longer text's."""
    if prompt.messages:
        tools = repr(prompt.tools) if prompt.tools else ""
        return [tools, *map(_message_piece, prompt.messages[: MOST_KEYS - 1])]
    ids = prompt.token_ids[: MOST_KEYS * BLOCK_CHARS]  # each id takes two characters at least
    text = "".join(f"{token}," for token in ids) if ids else prompt.text
    end = min(len(text), MOST_KEYS * BLOCK_CHARS)
    return [text[start : start + BLOCK_CHARS] for start in range(0, end, BLOCK_CHARS)]


def _message_piece(message: Message) -> str:
    """A message as text about as long as its content, so that ``chars``
    stays near what the prompt holds."""
    calls = repr(message.tool_calls) if message.tool_calls else ""
    return f"{message.role}\n{message.content}{calls}{message.tool_call_id}"


@dataclass(frozen=True)
class Key:
    """A prompt's first pieces, as one hash, and how many characters they hold."""

    hash: int
    chars: int


def prefix_keys(pieces: Sequence[str]) -> list[Key]:
    """One key per piece (at most ``MOST_KEYS``), each standing for every
    piece up to it: two prompts share the first ``n`` keys when they share
    the first ``n`` pieces (and otherwise only by a 64-bit collision).
    Python salts string hashes per process, which is fine: keys never leave
    the router that made them."""
    keys, key, chars = [], 0, 0
    for piece in pieces[:MOST_KEYS]:
        key, chars = hash((key, piece)), chars + len(piece)
        keys.append(Key(key, chars))
    return keys


def request_keys(request: PendingRequest | None) -> list[Key]:
    """The keys of the first of the prompts a ``stream`` call carries; none
    for any other call."""
    if request is None or request.metadata.call_method != ROUTED_METHOD:
        return []
    prompts = request.args[0] if request.args else None
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], Prompt):
        return prefix_keys(prompt_pieces(prompts[0]))
    return []


@dataclass(frozen=True)
class _Owner:
    replica: ReplicaID
    ended: bool
    """Some prompt routed before ended with this key's pieces."""


class PrefixOwners:
    """For each key, the replica that last took a prompt starting with it."""

    def __init__(self, capacity: int = REMEMBERED_KEYS) -> None:
        self.capacity = capacity
        self._owners: OrderedDict[int, _Owner] = OrderedDict()  # least recently routed first

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, keys: Sequence[Key], live: Collection[ReplicaID]) -> ReplicaID | None:
        """The replica among ``live`` that took the longest start of these
        keys worth following (``MIN_SHARED_CHARS``, or an earlier prompt
        whole); None where there is none."""
        for key in reversed(keys):
            owner = self._owners.get(key.hash)
            if owner and owner.replica in live and (owner.ended or key.chars >= MIN_SHARED_CHARS):
                return owner.replica
        return None

    def routed(self, keys: Sequence[Key], replica: ReplicaID) -> None:
        """``replica`` took a prompt with these keys: it owns them now."""
        for index, key in enumerate(keys):
            before = self._owners.get(key.hash)
            ended = index == len(keys) - 1 or (before is not None and before.ended)
            self._owners[key.hash] = _Owner(replica, ended)
            self._owners.move_to_end(key.hash)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)


def prefers_owner(owner_load: int | None, loads: Sequence[int | None], imbalance: int) -> bool:
    """Whether a prompt goes to the replica its start points to, given that
    replica's ongoing requests and every candidate's. None, a load not heard
    of lately, counts as 0: every request sent, and every one that ends,
    refreshes its replica's load, so a replica unheard of has had nothing
    from this router for a while (or has just started)."""
    least = min((load or 0 for load in loads), default=0)
    return (owner_load or 0) - least <= imbalance


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for the model deployment (``PREFIX_CACHE_MB``
    above 0 on CPU replicas): the replica a prompt's start points to first,
    then two others at random, the less busy of which Serve picks. A prompt
    no replica has seen, or whose replica runs more than ``imbalance``
    requests beyond the least busy, goes to the less busy of two at random,
    as with Serve's default router."""

    def initialize_state(self, imbalance: int = IMBALANCE, capacity: int = REMEMBERED_KEYS) -> None:
        self._imbalance = imbalance
        self._owners = PrefixOwners(capacity)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:  # all full: wait a little before trying again
            pending_request.routing_context.should_backoff = True
        try:
            owner = self._owner(candidate_replicas, pending_request)
        except Exception:  # a hint only: it must never keep a request from a replica
            logger.exception("Prefix routing failed; routing this request at random")
            owner = None
        if owner is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        others = [replica for replica in candidate_replicas if replica is not owner]
        return [[owner], random.sample(others, min(2, len(others)))]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        try:
            self._owners.routed(request_keys(pending_request), replica_id)
        except Exception:  # the request is on its way; only the hint is lost
            logger.exception("Prefix routing could not record where a request went")

    def _owner(
        self, candidates: list[RunningReplica], request: PendingRequest | None
    ) -> RunningReplica | None:
        """The replica the request's start draws it to, unless it is too busy."""
        by_id = {replica.replica_id: replica for replica in candidates}
        owner = self._owners.owner(request_keys(request), by_id)
        if owner is None:
            return None
        loads = self.replica_queue_len_cache
        if not prefers_owner(loads.get(owner), [loads.get(r) for r in by_id], self._imbalance):
            return None
        return by_id[owner]
