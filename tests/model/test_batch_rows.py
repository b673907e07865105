"""The two batch layouts decode the same text: slots of a paged cache (what
GPUs replay as CUDA graphs, run eagerly here) against the padded cache CPUs
use."""

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import padded_rows, paged_rows
from helpers.engine.engine import Engine, GenerationRequest, PromptTooLongError, Sampling
from helpers.engine.kv_budget import KVPlan
from helpers.engine.kv_cache import PAGE_SIZE, pages_for
from helpers.engine.padded_rows import PaddedRows
from helpers.engine.paged_rows import FIRST_PAGES, PagedRows
from tests.triton_interpreter import counted

PROMPTS = [
    "The capital of France is",
    "Write a haiku about Ray Serve.",
    "List three colours:\n1.",
]


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    loaded = Engine.load(
        EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir, cpu_threads=2, prepack=False
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    return tuple(  # type: ignore[return-value]
        Engine(model, tokenizer, model_id=EMBEDDED_MODEL_ID, max_batch_size=4, slots=slots)
        for slots in (False, True)
    )


def greedy(prompt: str, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(max_new_tokens, temperature=0.0, top_p=1.0))


@contextlib.contextmanager
def rows_per_pass(model: Any) -> Iterator[list[int]]:
    """The rows of each forward pass ``model`` runs inside the block."""
    calls: list[int] = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k)
    try:
        yield calls
    finally:
        del model.forward


def staggered(engine: Engine, requests: list[GenerationRequest]) -> list[str]:
    """The first request decodes a few steps alone; the others join its batch."""
    first = engine.submit(requests[0])
    passes = engine.stats.forward_passes
    while engine.stats.forward_passes < passes + 3 and not first.done():
        time.sleep(0.005)
    rest = [engine.submit(request) for request in requests[1:]]
    return [future.result().text for future in [first, *rest]]


def test_slots_decode_what_the_padded_cache_decodes(engines: tuple[Engine, Engine]) -> None:
    padded, slotted = engines
    requests = [greedy(prompt, 12 + 4 * i) for i, prompt in enumerate(PROMPTS)]
    expected = staggered(padded, requests)
    assert all(expected)
    assert staggered(slotted, requests) == expected


def test_decode_steps_read_the_pages_in_place_and_decode_the_same_text(
    engines: tuple[Engine, Engine],
) -> None:
    """With the paged decode kernel (a GPU's; Triton's interpreter runs it
    here), sequences joining and leaving decode the padded cache's text."""
    padded, slotted = engines
    kernel = Engine(slotted.model, slotted.tokenizer, model_id=EMBEDDED_MODEL_ID, slots=True)
    calls: list[int] = []
    kernel._batcher._rows.cache.decode_kernel = counted(calls)
    requests = [greedy(prompt, 8 + 2 * i) for i, prompt in enumerate(PROMPTS)]
    assert staggered(kernel, requests) == staggered(padded, requests)
    layers = slotted.model.config.num_hidden_layers
    assert len(calls) >= layers * kernel.stats.forward_passes // 2, "most passes are decode steps"


def test_a_decode_step_shrinks_to_the_rows_left(engines: tuple[Engine, Engine]) -> None:
    """When the first three rows end, the fourth moves to the first slot, so
    the steps after run over one slot, not four (on a GPU, a smaller graph),
    and every row decodes the padded cache's text."""
    padded, slotted = engines
    sampling = [Sampling(n, temperature=0.0, top_p=1.0, ignore_eos=True) for n in (3, 3, 3, 12)]
    prompts = [*PROMPTS, "Ray Serve scales replicas"]
    requests = [GenerationRequest(p, s) for p, s in zip(prompts, sampling, strict=True)]
    with rows_per_pass(slotted.model) as calls:
        got = slotted.generate(requests)
    assert [c.text for c in got] == [c.text for c in padded.generate(requests)]
    assert [c.completion_tokens for c in got] == [3, 3, 3, 12]
    # One prefill, two steps of four rows, then the fourth row's nine alone.
    assert calls == [4, 4, 4, *[1] * 9]


def test_a_step_runs_ahead_only_as_a_graph_captured_already(
    engines: tuple[Engine, Engine],
) -> None:
    """The batcher decodes streamed text after a step that returns once
    queued (a captured graph's replay) and before one that runs first (an
    eager step, or the capture of a shape not seen yet)."""
    padded, slotted = engines
    assert not padded._batcher._rows.step_runs_ahead()
    rows = PagedRows(slotted.model, slotted.tokenizer, 4, False, slotted.context_length)
    prompt = slotted.tokenizer(PROMPTS[0])["input_ids"]
    with torch.inference_mode():
        rows.admit([prompt, prompt], [len(prompt) + 8] * 2)
    assert not rows.step_runs_ahead(), "eager: no graphs at all"
    rows.graphs = {(2, 64): None}  # as if that shape had been captured
    assert rows.step_runs_ahead()
    rows.keep([1])
    assert not rows.step_runs_ahead(), "one row left: a shape not captured yet"


def test_the_pages_grow_past_their_first_pool(engines: tuple[Engine, Engine]) -> None:
    """A long prompt joins a running sequence: the cache doubles, keeping the
    first sequence's pages as they were."""
    padded, slotted = engines
    fresh = Engine(slotted.model, slotted.tokenizer, model_id=EMBEDDED_MODEL_ID, slots=True)
    long_prompt = "Count on: " + ", ".join(str(n) for n in range(62))
    assert fresh.count_tokens(long_prompt) + 24 > FIRST_PAGES * PAGE_SIZE
    requests = [greedy(PROMPTS[0], 24), greedy(long_prompt, 24)]
    assert fresh._batcher._rows.cache.pages == FIRST_PAGES
    assert staggered(fresh, requests) == staggered(padded, requests)
    assert fresh._batcher._rows.cache.pages > FIRST_PAGES


def test_a_freed_slot_serves_the_next_sequence_cleanly(engines: tuple[Engine, Engine]) -> None:
    """A slot keeps the old sequence's keys past the new one's end; they must
    stay invisible to it."""
    _, slotted = engines
    alone = slotted.generate([greedy(PROMPTS[2], 10)])[0].text
    slotted.generate([greedy(PROMPTS[1] * 6, 20)])  # fills slot 0 far past PROMPTS[2]
    assert slotted.generate([greedy(PROMPTS[2], 10)])[0].text == alone


def test_pages_are_cleared_for_their_next_sequence(engines: tuple[Engine, Engine]) -> None:
    """Even a NaN left in a page's masked columns must not reach the next
    sequence there (masked weights are zero, and zero times NaN is NaN)."""
    _, slotted = engines
    alone = slotted.generate([greedy(PROMPTS[0], 8)])[0].text
    cache = slotted._batcher._rows.cache  # the pages the next prompt moves into
    with torch.inference_mode():  # the decode thread may have made them there
        for layer in cache.layers:
            layer.values[1:] = float("nan")  # every page but scratch
    assert slotted.generate([greedy(PROMPTS[0], 8)])[0].text == alone


@pytest.mark.parametrize("layout", ["padded", "slots"])
def test_a_repeated_prompt_is_prefilled_once_and_its_rows_decode_alike(
    engines: tuple[Engine, Engine], layout: str
) -> None:
    """A request's ``n`` choices: one prefill, the other rows copied from it,
    each then decoding exactly as the prompt admitted alone does."""
    engine = engines[layout == "slots"]
    rows_type = type(engine._batcher._rows)
    model, tokenizer = engine.model, engine.tokenizer
    context = engine.context_length
    rows, alone = (
        rows_type(model, tokenizer)
        if layout == "padded"
        else rows_type(model, tokenizer, 4, False, context)
        for _ in range(2)
    )
    repeated, other = (tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    room = [len(prompt) + 8 for prompt in (repeated, other, repeated, repeated)]
    with torch.inference_mode():
        with rows_per_pass(model) as calls:
            lengths = rows.admit([repeated, other, repeated, repeated], room)
        assert calls == [2], "two distinct prompts, one pass"
        assert lengths == [len(repeated), len(other), len(repeated), len(repeated)]
        alone.admit([repeated], room[:1])
        for _ in range(3):
            tokens = rows.logits.argmax(-1).tolist()
            assert tokens[0] == tokens[2] == tokens[3] == int(alone.logits[0].argmax())
            # The same up to rounding: attention's CPU kernel does not always
            # round two equal rows of one batch alike (seen in the padded
            # layout on an AMD EPYC host, 4e-5 apart), and alone the sums run
            # in another order.
            for row in (2, 3):
                torch.testing.assert_close(rows.logits[row], rows.logits[0], rtol=0, atol=1e-3)
            torch.testing.assert_close(rows.logits[0], alone.logits[0], rtol=0, atol=1e-3)
            rows.decode(tokens)
            alone.decode([tokens[0]])


def test_a_large_admission_is_prefilled_in_passes(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts whose padded tokens pass ``PREFILL_TOKENS`` take a pass each
    here, and decode as they do admitted in one pass."""
    _, slotted = engines
    model, tokenizer = slotted.model, slotted.tokenizer
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    room = [len(prompt) + 8 for prompt in prompts]
    whole, cut = (PagedRows(model, tokenizer, 4, False, slotted.context_length) for _ in range(2))
    with torch.inference_mode():
        whole.admit(prompts, room)
        monkeypatch.setattr(paged_rows, "PREFILL_TOKENS", max(map(len, prompts)))
        with rows_per_pass(model) as calls:
            cut.admit(prompts, room)
        assert calls == [1, 1, 1] and cut.prefill_passes == 3
        for _ in range(4):
            tokens = whole.logits.argmax(-1).tolist()
            assert cut.logits.argmax(-1).tolist() == tokens
            torch.testing.assert_close(cut.logits, whole.logits, rtol=0, atol=1e-3)
            whole.decode(tokens)
            cut.decode(tokens)


def test_a_kv_budget_fixes_the_pages_and_the_text_stays(
    engines: tuple[Engine, Engine],
) -> None:
    """A replica sharing a GPU (its plan from :mod:`helpers.engine.kv_budget`):
    the pages never grow, a sequence waits for pages to free rather than
    join without them, one that could never fit is refused by name, and the
    text is the padded cache's."""
    padded, slotted = engines
    long_prompt = "Count on: " + ", ".join(str(n) for n in range(62))
    requests = [greedy(PROMPTS[0], 24), greedy(long_prompt, 24), greedy(PROMPTS[1], 24)]
    needs = [pages_for(slotted.count_tokens(r.prompt) + 24) for r in requests]
    plan = KVPlan(pages=needs[0] + needs[1], positions=(needs[0] + needs[1]) * PAGE_SIZE)
    budgeted = Engine(
        slotted.model,
        slotted.tokenizer,
        model_id=EMBEDDED_MODEL_ID,
        max_batch_size=4,
        slots=True,
        kv_plan=plan,
    )
    assert budgeted.context_length == plan.positions
    with budgeted.together():
        futures = [budgeted.submit(request) for request in requests]
    # A timeout: pages that leaked would keep the third waiting for ever.
    got = [future.result(timeout=120) for future in futures]
    assert [c.text for c in got] == [c.text for c in padded.generate(requests)]
    assert budgeted.stats.largest_batch == 2, "the third waited for the first's pages"
    assert budgeted._batcher._rows.cache.pages == plan.pages
    with pytest.raises(PromptTooLongError, match=r"share of its GPU holds \(GPU_MEMORY_FRACTION\)"):
        budgeted.check_fits(greedy(long_prompt, plan.positions))


def test_a_sequence_longer_than_the_pages_can_list_is_refused_alone(
    engines: tuple[Engine, Engine],
) -> None:
    """Submitted unchecked (``check_fits`` skipped), it fails by itself,
    before the decode thread sees it, and the batch beside it decodes on."""
    padded, slotted = engines
    alone = padded.generate([greedy(PROMPTS[0], 16)])[0].text
    running = slotted.submit(greedy(PROMPTS[0], 16))
    too_long = slotted.submit(greedy(PROMPTS[1], slotted.context_length))
    with pytest.raises(PromptTooLongError, match=r"positions a sequence may have in this cache"):
        too_long.result(timeout=60)
    assert running.result(timeout=60).text == alone


def free_pages_after_the_turn(engine: Engine) -> list[int]:
    """The free pages once the decode thread has ended the turn that settled
    the last future: a finished row's pages go back after its future is set,
    and a chore runs at the start of the next turn."""
    engine._batcher.between_steps([lambda: None], wake=True).result(timeout=60)
    return engine._batcher._rows.cache.free


def test_a_prefill_that_fails_fails_only_its_own_request(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer's prefill that raises (a GPU out of memory on a long prompt)
    fails that newcomer; the rows decoding meanwhile finish their text, and
    the newcomer's pages go back, and torch's cache gives the GPU's memory
    back for the replicas sharing it."""
    _, slotted = engines
    alone = slotted.generate([greedy(PROMPTS[0], 12)])[0].text
    rows = slotted._batcher._rows
    free = len(free_pages_after_the_turn(slotted))
    holding, release = threading.Event(), threading.Event()

    def held(_: str) -> None:
        holding.set()
        release.wait(60)

    def out_of_memory(*_: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("out of memory")

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    running = slotted.submit(greedy(PROMPTS[0], 12), on_text=held)
    assert holding.wait(60)
    rows._prefill = out_of_memory  # the decode thread is held: it reads this next turn
    try:
        newcomer = slotted.submit(greedy(PROMPTS[1], 12))
        release.set()
        assert str(newcomer.exception(timeout=60)) == "out of memory"
    finally:
        del rows._prefill
    assert emptied == [True]
    assert running.result(timeout=60).text == alone
    assert len(free_pages_after_the_turn(slotted)) == free


def test_a_padded_merge_that_fails_midway_leaves_the_running_rows_as_they_were(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers copied before a failure are cut back to the running rows and
    their columns, so the batch decodes on as if the newcomer never came."""
    padded, _ = engines
    rows = PaddedRows(padded.model, padded.tokenizer, groups=1)  # the newcomer merges
    short, long = (padded.tokenizer(text)["input_ids"] for text in (PROMPTS[0], PROMPTS[1] * 3))
    with torch.inference_mode():
        rows.admit([short], [len(short) + 8])
        (group,) = rows.groups
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in group.cache.layers]
        mask = group.mask.clone()
        calls, stacked = itertools.count(), padded_rows._stacked

        def fails_at_the_third_layer(*args: Any) -> torch.Tensor:
            if next(calls) == 5:  # one call for keys and one for values per layer
                raise RuntimeError("out of memory")
            return stacked(*args)

        monkeypatch.setattr(padded_rows, "_stacked", fails_at_the_third_layer)
        with pytest.raises(RuntimeError, match="out of memory"):
            rows.admit([long], [len(long) + 8])
    assert rows.groups == [group] and torch.equal(group.mask, mask)
    for layer, (keys, values) in zip(group.cache.layers, kept, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
