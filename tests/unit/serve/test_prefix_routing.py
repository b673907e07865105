"""Which model replica a request goes to: the one that took the longest start
of its prompt, unless load says otherwise (``helpers.serve.prefix_routing``).
The router runs here as Serve builds it, without a cluster; a real one
routes a chat in ``tests/integration/test_prefix_routing.py``."""

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

# Serve's own ids: the router is constructed here as a handle constructs it.
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from helpers.protocol import Function, Message, Prompt
from helpers.serve.prefix_routing import (
    BLOCK_CHARS,
    IMBALANCE,
    MIN_SHARED_CHARS,
    MOST_KEYS,
    Key,
    PrefixAffinityRouter,
    PrefixOwners,
    prefers_owner,
    prefix_keys,
    prompt_pieces,
    request_keys,
)

DEPLOYMENT = DeploymentID(name="LLMServer", app_name="RayServeLLM")
SYSTEM = Message("system", "You answer questions about Ray Serve. " * 8)


def replica(name: str) -> ReplicaID:
    return ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)


def chat(*said: str) -> Prompt:
    """A conversation: the system prompt, then turns taken in order."""
    roles = ("user", "assistant")
    return Prompt(messages=(SYSTEM, *(Message(roles[i % 2], s) for i, s in enumerate(said))))


def call(*prompts: Prompt) -> Any:
    """A model call as the router sees it: ``stream(prompts, sampling, streamed)``."""
    return SimpleNamespace(
        args=[list(prompts), object(), True],
        metadata=SimpleNamespace(call_method="stream"),
        routing_context=SimpleNamespace(should_backoff=False),
    )


def keys_of(prompt: Prompt) -> list[Key]:
    return prefix_keys(prompt_pieces(prompt))


def test_a_chats_next_turn_starts_with_every_key_of_the_turn_before() -> None:
    first = keys_of(chat("What is a replica?"))
    later_turn = chat("What is a replica?", "A copy.", "And a proxy?")
    later = keys_of(later_turn)
    assert len(first) == 3 and later[:3] == first and len(later) == 5  # tools, then messages
    assert later[-1].chars == sum(len(piece) for piece in prompt_pieces(later_turn))


def test_texts_share_keys_up_to_the_block_where_they_part() -> None:
    same = "x" * (3 * BLOCK_CHARS)
    a = keys_of(Prompt(text=same + "a" * (2 * BLOCK_CHARS)))
    b = keys_of(Prompt(text=same + "b" * (2 * BLOCK_CHARS)))
    assert len(a) == len(b) == 5
    assert a[:3] == b[:3] and all(x.hash != y.hash for x, y in zip(a[3:], b[3:], strict=True))
    changed_first = keys_of(Prompt(text="y" + same[1:] + "a" * (2 * BLOCK_CHARS)))
    assert all(x.hash != y.hash for x, y in zip(a, changed_first, strict=True))
    assert [key.chars for key in a] == [BLOCK_CHARS * n for n in range(1, 6)]


def test_a_texts_last_block_may_be_short_and_there_are_no_more_keys_than_the_most() -> None:
    assert [k.chars for k in keys_of(Prompt(text="x" * (2 * BLOCK_CHARS + 5)))] == [
        BLOCK_CHARS,
        2 * BLOCK_CHARS,
        2 * BLOCK_CHARS + 5,
    ]
    assert len(keys_of(Prompt(text="x" * ((MOST_KEYS + 3) * BLOCK_CHARS)))) == MOST_KEYS
    assert len(keys_of(Prompt(token_ids=tuple(range(50_000))))) == MOST_KEYS
    assert len(keys_of(chat(*["q"] * (MOST_KEYS + 5)))) == MOST_KEYS


@pytest.mark.parametrize(
    ("shorter", "longer", "kept"),
    [
        (Prompt(text="t" * 300), Prompt(text="t" * 300 + "more" * 40), 4),
        (Prompt(token_ids=tuple(range(100))), Prompt(token_ids=tuple(range(150))), 4),
        (chat("q" * 20), chat("q" * 20, "a", "q2"), 3),
    ],
    ids=["text", "token ids", "messages"],
)
def test_a_prompt_that_grows_keeps_its_pieces_but_a_short_last_block(
    shorter: Prompt, longer: Prompt, kept: int
) -> None:
    """A chat keeps every piece; a text keeps its whole blocks."""
    before, after = prompt_pieces(shorter), prompt_pieces(longer)
    assert after[:kept] == before[:kept] and len(after) > len(before)
    assert len(before) == kept or after[kept] != before[kept]


def test_the_tools_a_chat_offers_come_before_its_messages() -> None:
    tool = Function("weather", "The weather in a city.", '{"type": "object"}')
    offered = Prompt(messages=chat("q").messages, tools=(tool,))
    assert keys_of(offered)[0] != keys_of(chat("q"))[0]


def test_the_keys_of_a_stream_call_are_its_first_prompts_and_other_calls_have_none() -> None:
    """``tokenize`` leaves nothing in a replica's cache, so it draws nothing."""
    prompt = Prompt(text="t" * 400)
    assert request_keys(call(prompt, Prompt(text="u" * 400))) == keys_of(prompt)
    tokenize = SimpleNamespace(
        args=[prompt, True], metadata=SimpleNamespace(call_method="tokenize")
    )
    assert request_keys(tokenize) == []
    assert request_keys(SimpleNamespace(args=[[1, 2]], metadata=call().metadata)) == []
    assert request_keys(None) == []


def test_the_owner_is_the_live_replica_that_took_the_longest_start() -> None:
    owners = PrefixOwners()
    a, b = replica("a"), replica("b")
    system_only = keys_of(Prompt(text="s" * 3 * BLOCK_CHARS))
    conversation = keys_of(Prompt(text="s" * 3 * BLOCK_CHARS + "c" * 2 * BLOCK_CHARS))
    owners.routed(system_only, a)
    owners.routed(conversation, b)
    assert owners.owner([*conversation, Key(123, 10**6)], {a, b}) == b
    assert owners.owner(system_only, {a, b}) == b  # b took those keys last
    owners.routed(system_only, a)
    assert owners.owner(conversation, {a, b}) == b
    assert owners.owner(conversation, {a}) == a  # b gone: the longest start a took
    assert owners.owner(keys_of(Prompt(text="z" * BLOCK_CHARS)), {a, b}) is None
    assert owners.owner([], {a, b}) is None


def test_a_short_shared_start_draws_a_prompt_only_where_an_earlier_prompt_ended() -> None:
    """A chat whose first turn was short follows it; unrelated prompts that
    share a short system message do not gather on one replica."""
    owners = PrefixOwners()
    a, b = replica("a"), replica("b")
    short_system = Message("system", "Be brief.")
    first = Prompt(messages=(short_system, Message("user", "Hi")))
    assert keys_of(first)[-1].chars < MIN_SHARED_CHARS
    owners.routed(keys_of(first), a)
    follow_up = Prompt(
        messages=(*first.messages, Message("assistant", "Hello!"), Message("user", "Why?"))
    )
    assert owners.owner(keys_of(follow_up), {a, b}) == a
    unrelated = Prompt(messages=(short_system, Message("user", "What is Ray?")))
    assert owners.owner(keys_of(unrelated), {a, b}) is None
    long_system = Message("system", "Be brief. " * 20)
    owners.routed(keys_of(Prompt(messages=(long_system, Message("user", "Hi")))), b)
    sharing = Prompt(messages=(long_system, Message("user", "What is Ray?")))
    assert owners.owner(keys_of(sharing), {a, b}) == b
    header = "Answer in one sentence, plainly, without lists or code blocks. Q:"
    owners.routed(keys_of(Prompt(text=header + " What is Ray?")), a)
    assert owners.owner(keys_of(Prompt(text=header + " What is a replica?")), {a, b}) is None
    assert owners.owner(keys_of(Prompt(text=header + " What is Ray?")), {a, b}) == a


def test_past_its_capacity_the_least_recently_routed_keys_go_first() -> None:
    owners = PrefixOwners(capacity=3)
    a, b = replica("a"), replica("b")
    short = keys_of(Prompt(text="o" * BLOCK_CHARS))  # one key, where a prompt ended
    owners.routed(short, a)
    assert owners.owner(short, {a, b}) == a
    longer = keys_of(Prompt(text="n" * 3 * BLOCK_CHARS))
    owners.routed(longer, b)
    assert len(owners) == 3
    assert owners.owner(short, {a, b}) is None
    assert owners.owner(longer, {a, b}) == b


@pytest.mark.parametrize(
    ("owner_load", "loads", "goes_to_owner"),
    [
        (None, [None, 0], True),
        (IMBALANCE, [IMBALANCE, None], True),
        (IMBALANCE, [IMBALANCE, 0], True),
        (IMBALANCE + 1, [IMBALANCE + 1, 0], False),
        (IMBALANCE + 1, [IMBALANCE + 1, 1, 3], True),
        (IMBALANCE + 1, [IMBALANCE + 1, 1, None], False),  # not heard of lately: idle
        (9, [9, 7], True),
    ],
)
def test_load_wins_only_past_the_imbalance(
    owner_load: int | None, loads: list[int | None], goes_to_owner: bool
) -> None:
    assert prefers_owner(owner_load, loads, IMBALANCE) is goes_to_owner


def routed(router: PrefixAffinityRouter, replicas: list[Any], request: Any) -> list[list[Any]]:
    """The router's ranks for ``request``, and the first of them taken."""
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    router.on_request_routed(request, ranks[0][0].replica_id, None)
    return ranks


@pytest.fixture
def router() -> PrefixAffinityRouter:
    made = PrefixAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    made.initialize_state()
    return made


def test_a_chats_every_turn_goes_where_its_first_went(router: PrefixAffinityRouter) -> None:
    replicas = [SimpleNamespace(replica_id=replica(name)) for name in "abcd"]
    said: list[str] = []
    first = routed(router, replicas, call(chat("What is a replica?")))
    assert len(first) == 1 and len(first[0]) == 2  # nobody has it: two at random
    taken = first[0][0]
    for turn in range(5):
        said += [f"What is a replica? {turn}", f"A copy of the deployment. {turn}"]
        ranks = routed(router, replicas, call(chat("What is a replica?", *said, "More?")))
        assert ranks[0] == [taken]
        assert taken not in ranks[1] and len(ranks[1]) == 2


def test_a_busy_replica_loses_the_prompts_that_point_to_it(router: PrefixAffinityRouter) -> None:
    replicas = [SimpleNamespace(replica_id=replica(name)) for name in "ab"]
    prompt = call(chat("What does scale to zero mean?"))
    taken = routed(router, replicas, prompt)[0][0]
    other = next(r for r in replicas if r is not taken)
    router.replica_queue_len_cache.update(taken.replica_id, IMBALANCE + 1)
    router.replica_queue_len_cache.update(other.replica_id, 0)
    ranks = asyncio.run(router.choose_replicas(replicas, prompt))
    assert len(ranks) == 1 and set(map(id, ranks[0])) == set(map(id, replicas))
    router.replica_queue_len_cache.update(taken.replica_id, IMBALANCE)
    assert asyncio.run(router.choose_replicas(replicas, prompt))[0] == [taken]


def test_a_prompt_sharing_only_a_short_start_goes_to_two_at_random(
    router: PrefixAffinityRouter,
) -> None:
    replicas = [SimpleNamespace(replica_id=replica(name)) for name in "abc"]
    routed(router, replicas, call(Prompt(text="Hi, what is Ray?")))
    other = call(Prompt(text="Hi, what is Serve?"))
    ranks = [asyncio.run(router.choose_replicas(replicas, other)) for _ in range(30)]
    assert all(len(r) == 1 and len(r[0]) == 2 for r in ranks)
    assert len({id(r[0][0]) for r in ranks}) > 1


def test_a_request_that_finds_every_replica_full_waits_before_its_next_try(
    router: PrefixAffinityRouter,
) -> None:
    """Serve retries at once, without end, unless the router asks it to back off."""
    request = call(chat("What is a replica?"))
    asyncio.run(router.choose_replicas([SimpleNamespace(replica_id=replica("a"))], request))
    assert request.routing_context.should_backoff is True


def test_a_failure_of_the_router_itself_routes_at_random_and_loses_no_request(
    router: PrefixAffinityRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("a bug in the table")

    replicas = [SimpleNamespace(replica_id=replica(name)) for name in "ab"]
    monkeypatch.setattr(router._owners, "owner", broken)
    monkeypatch.setattr(router._owners, "routed", broken)
    request = call(chat("What is a replica?"))
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    router.on_request_routed(request, replicas[0].replica_id, None)
