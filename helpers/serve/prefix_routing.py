"""Which model replica takes a request: the one that last took a prompt
starting the same way, unless it is much busier than another.

Why: a CPU replica keeps what its ended sequences computed (the prefix
cache, ``PREFIX_CACHE_MB``), but only for prompts it sees itself. Serve's
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

import random
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from helpers.protocol import Message, Prompt

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
hashing stops there however long the prompt."""

REMEMBERED_KEYS = 65_536
"""Keys the table remembers, the least recently routed going first: a few
megabytes in the ingress."""

IMBALANCE = 4
"""Requests by which the replica a prompt's start points to may outnumber
the least busy replica before load wins and the prompt goes elsewhere: a
replica gives a request a row of its batch at once, so a few more rows cost
it slower decode steps, while the prefill a kept start saves grows with the
conversation (decision 0041)."""


def prompt_pieces(prompt: Prompt) -> list[str]:
    """``prompt`` in pieces that a conversation which goes on only adds to:
    a chat's tools (chat templates put them first), then each message; a
    text or its token ids in blocks, the last partial block left out."""
    if prompt.messages:
        return [repr(prompt.tools) if prompt.tools else "", *map(_message_piece, prompt.messages)]
    text = "".join(f"{token}," for token in prompt.token_ids) if prompt.token_ids else prompt.text
    whole = len(text) // BLOCK_CHARS * BLOCK_CHARS
    return [text[start : start + BLOCK_CHARS] for start in range(0, whole, BLOCK_CHARS)]


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
    """The keys of the first prompt a model call carries (``stream`` takes a
    list of them, ``tokenize`` one); none for a call without a prompt."""
    for arg in request.args if request is not None else ():
        prompts = arg if isinstance(arg, list) else [arg]
        if prompts and isinstance(prompts[0], Prompt):
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
    replica's ongoing requests and every candidate's (None: not known yet,
    which counts as no reason to look elsewhere)."""
    known = [load for load in loads if load is not None]
    return owner_load is None or not known or owner_load - min(known) <= imbalance


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for the model deployment (``PREFIX_CACHE_MB``
    above 0 on CPU replicas): the replica a prompt's start points to first,
    then two others at random, the less busy of which Serve picks. A prompt
    no replica has seen, or whose replica is ``imbalance`` requests busier
    than another, goes to the less busy of two at random, as with Serve's
    default router."""

    def initialize_state(self, imbalance: int = IMBALANCE, capacity: int = REMEMBERED_KEYS) -> None:
        self._imbalance = imbalance
        self._owners = PrefixOwners(capacity)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        owner = self._owners.owner(request_keys(pending_request), by_id)
        if owner is not None:
            loads = self.replica_queue_len_cache
            if prefers_owner(loads.get(owner), [loads.get(r) for r in by_id], self._imbalance):
                others = [replica for replica in candidate_replicas if replica.replica_id != owner]
                return [[by_id[owner]], random.sample(others, min(2, len(others)))]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self._owners.routed(request_keys(pending_request), replica_id)
