"""The engine on the real embedded model: no Ray involved."""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

import pytest
import torch

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine import engine as engine_module
from helpers.engine.batcher import BatcherClosedError, ContinuousBatcher
from helpers.engine.cpu_linear import PrepackedLinear, can_prepack
from helpers.engine.engine import (
    Engine,
    GenerationRequest,
    PromptTooLongError,
    Sampling,
    TokenIdError,
    not_finite,
)
from helpers.protocol import Completion, FieldError

from .conftest import padded_only

PROMPTS = [
    "The capital of France is",
    "Write a haiku about Ray Serve.",
    "List three colours:\n1.",
    "Hi",
]


def greedy(prompt: str, max_new_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt, Sampling(max_new_tokens, temperature=0.0, top_p=1.0))


def test_greedy_decoding_is_deterministic(engine: Engine) -> None:
    first = engine.generate([greedy(PROMPTS[0])])[0]
    second = engine.generate([greedy(PROMPTS[0])])[0]
    assert first.text and first == second


def test_a_prompt_completes_the_same_alone_and_inside_a_batch(engine: Engine) -> None:
    alone = [engine.generate([greedy(p)])[0].text for p in PROMPTS]
    batched = [c.text for c in engine.generate([greedy(p) for p in PROMPTS])]
    assert batched == alone


def test_a_prompt_sent_as_token_ids_completes_as_its_text(engine: Engine) -> None:
    ids = tuple(engine.tokenizer(PROMPTS[2])["input_ids"])
    as_text, as_ids = engine.generate(
        [greedy(PROMPTS[2]), engine.request(ids, greedy("").sampling)]
    )
    assert as_ids == as_text and as_ids.prompt_tokens == len(ids)
    vocabulary = engine.model.config.vocab_size
    with pytest.raises(TokenIdError, match=f"prompt: token id {vocabulary} is outside") as caught:
        engine.request((1, vocabulary), greedy("").sampling)
    assert caught.value.field == "prompt"


def test_completions_hold_only_the_new_tokens(engine: Engine) -> None:
    # A prompt whose text does not survive a tokenize/decode round trip
    # unchanged: stripping the prompt as a string would go wrong here.
    prompt = "Numbers:   1,   2,   3,"
    completion = engine.generate([greedy(prompt, 8)])[0]
    assert completion.prompt_tokens == engine.count_tokens(prompt)
    assert completion.completion_tokens == 8
    assert not completion.text.startswith("Numbers")
    regenerated = engine.tokenizer(prompt + completion.text)["input_ids"]
    assert len(regenerated) > completion.prompt_tokens


def test_each_request_keeps_its_own_token_limit(engine: Engine) -> None:
    short, long = engine.generate([greedy(PROMPTS[2], 3), greedy(PROMPTS[2], 9)])
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    assert long.completion_tokens <= 9
    assert long.text.startswith(short.text)


def test_an_end_of_sequence_token_stops_with_reason_stop(engine: Engine) -> None:
    prompt = engine.format_prompt("Reply with the single word: yes", "chat")
    completion = engine.generate([greedy(prompt, 64)])[0]
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens < 64


@padded_only
def test_sampling_with_a_seed_is_reproducible(engine: Engine) -> None:
    def sample(seed: int) -> str:
        request = GenerationRequest(PROMPTS[1], Sampling(8, temperature=1.0, top_p=0.95, seed=seed))
        return engine.generate([request])[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_tiny_top_p_keeps_only_the_most_likely_token(engine: Engine) -> None:
    nucleus = GenerationRequest(PROMPTS[0], Sampling(12, temperature=1.5, top_p=1e-6, seed=3))
    assert engine.generate([nucleus])[0].text == engine.generate([greedy(PROMPTS[0])])[0].text


def test_chat_format_wraps_the_prompt_in_the_template(engine: Engine) -> None:
    wrapped = engine.format_prompt("Hello", "auto")
    assert wrapped != "Hello" and "Hello" in wrapped
    assert engine.format_prompt("Hello", "raw") == "Hello"


def test_a_prompt_longer_than_the_context_is_refused(engine: Engine) -> None:
    too_long = greedy("word " * engine.context_length, 1)
    with pytest.raises(PromptTooLongError, match="context length"):
        engine.check_fits(too_long)
    engine.check_fits(greedy("short prompt", 16))


def test_a_checked_request_is_tokenized_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine.request tokenizes the prompt to check its length and keeps the
    ids, so the replica's event loop never tokenizes it again at submission."""
    text = engine.format_prompt("Name a colour.", "auto")
    request = engine.request(text, greedy(text, 4).sampling)
    assert request.prompt_ids == tuple(engine.tokenizer(text)["input_ids"])
    expected = engine.generate([request])[0].text

    def tokenized_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the prompt was tokenized a second time")

    monkeypatch.setattr(type(engine.tokenizer), "__call__", tokenized_again)
    assert engine.generate([request])[0].text == expected


def test_concurrent_requests_share_forward_passes(engine: Engine) -> None:
    before = engine.stats.forward_passes, engine.stats.generated_tokens
    completions = engine.generate([greedy(p, 6) for p in PROMPTS])
    passes = engine.stats.forward_passes - before[0]
    tokens = engine.stats.generated_tokens - before[1]
    assert tokens == sum(c.completion_tokens for c in completions)
    # Decoded one by one, every token would cost a forward pass of its own.
    assert passes < tokens
    assert engine.stats.largest_batch > 1


@padded_only
def test_the_rows_a_reader_took_stay_as_they_were_when_others_join(engine: Engine) -> None:
    """batch_load reads the decode thread's list of sequences from another
    thread without a lock: the decode thread replaces it, never changes it."""
    held = HeldAtFirstPiece()
    first = engine.submit(greedy(PROMPTS[0]), on_text=held)
    assert held.holding.wait(60)
    taken = engine._batcher._sequences
    rows = list(taken)
    joining = engine.submit(greedy(PROMPTS[1]))
    held.release.set()
    for future in (first, joining):
        future.result(timeout=60)
    assert taken == rows


@pytest.mark.parametrize("engine", ["slots"], indirect=True)
def test_a_prompt_prefilled_in_a_pass_of_its_own_counts_as_a_row_meanwhile(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where prefills take passes of their own (slots, transformers' models),
    a long prompt's passes take a while: the replica's batch gauges
    (``llm_batch_rows``) must count it, or they show a busy replica idle."""
    rows = engine._batcher._rows
    admit, inside, release = rows.admit, threading.Event(), threading.Event()

    def held_admit(*args: object) -> list[int]:
        inside.set()
        assert release.wait(60)
        return admit(*args)

    monkeypatch.setattr(rows, "admit", held_admit)
    request = engine.submit(greedy(PROMPTS[0], 4))
    try:
        assert inside.wait(60)
        load = engine.batch_load()
    finally:
        release.set()
    assert request.result(timeout=60).completion_tokens == 4
    assert (load.rows, load.waiting) == (1, 0)


@padded_only
def test_prompts_taken_from_the_queue_count_as_rows_before_they_are_prefills(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between leaving the queue and becoming prefills (while the padded
    layout splits them by length and builds their tensors) arrivals are
    neither waiting nor prefilling: the gauges must count them all the same,
    or a replica that has just taken work reads as idle."""
    rows = engine._batcher._rows
    split, seen = rows.prefills_by_length, []

    def watched(prompts: list[list[int]]) -> object:
        seen.append(engine.batch_load())  # on the decode thread, mid-admission
        return split(prompts)

    monkeypatch.setattr(rows, "prefills_by_length", watched)
    assert engine.submit(greedy(PROMPTS[0], 4)).result(timeout=60).completion_tokens == 4
    assert [(load.rows, load.waiting) for load in seen] == [(1, 0)]


def test_a_request_joining_a_running_batch_decodes_as_if_alone(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    """With the padded cache it joins inside the running batch's decode step:
    its prefill rides along that step rather than taking a pass of its own
    (slots, fixed shapes for CUDA graphs, prefill apart). It is submitted
    from the first request's stream, so it surely arrives mid-sequence."""
    alone = [engine.generate([greedy(p, 16)])[0] for p in PROMPTS[:2]]
    folded = engine.stats.folded_prefills
    pieces: list[str] = []
    second: list[Future] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            second.append(engine.submit(greedy(PROMPTS[1], 16)))

    first = engine.submit(greedy(PROMPTS[0], 16), on_text)
    assert [first.result(), second[0].result()] == alone
    padded = request.node.callspec.params["engine"] == "padded"
    assert engine.stats.folded_prefills == folded + (1 if padded else 0)


def test_streamed_text_equals_the_completion_even_inside_a_batch(engine: Engine) -> None:
    pieces: dict[int, list[str]] = {0: [], 1: []}
    futures = [
        engine.submit(greedy(prompt, 16), on_text=pieces[i].append)
        for i, prompt in enumerate(PROMPTS[:2])
    ]
    completions = [f.result() for f in futures]
    for i, completion in enumerate(completions):
        assert len(pieces[i]) > 1
        assert "".join(pieces[i]) == completion.text
    assert [c.text for c in completions] == [
        engine.generate([greedy(p, 16)])[0].text for p in PROMPTS[:2]
    ]


@padded_only
def test_text_decoded_while_a_gpus_step_runs_streams_the_same(engine: Engine) -> None:
    """On a GPU the new tokens' text is decoded after the next step is
    queued, to run while it computes; here, with the step said to run
    ahead as a GPU's replay does, each piece
    still reaches its stream in order and before its future resolves, a
    stop string still cuts the text, and the completions are the inline
    ones. The first piece arrives only once the step after its token began."""
    stop = engine.generate([greedy(PROMPTS[2], 16)])[0].text.strip()[3:6]
    requests = [
        greedy(PROMPTS[0], 16),
        greedy(PROMPTS[1], 16),
        GenerationRequest(PROMPTS[2], Sampling(16, 0.0, 1.0, stop=(stop,))),
    ]
    expected = [c.text for c in engine.generate(requests)]
    after_step = Engine(engine.model, engine.tokenizer, model_id=EMBEDDED_MODEL_ID, slots=True)
    after_step._batcher._rows.step_runs_ahead = lambda: True  # as a captured graph's replay
    events: list[str] = []
    forward = engine.model.forward
    engine.model.forward = lambda *a, **k: events.append("pass") or forward(*a, **k)
    try:
        pieces: list[list[str]] = [[], [], []]

        def stream(row: int) -> Callable[[str], None]:
            def on_text(piece: str) -> None:
                assert not futures[row].done(), "a piece after its future resolved"
                pieces[row].append(piece)
                events.append(f"text {row}")

            return on_text

        with after_step.together():
            futures = [after_step.submit(r, stream(i)) for i, r in enumerate(requests)]
        completions = [f.result(timeout=120) for f in futures]
    finally:
        del engine.model.forward
    assert [c.text for c in completions] == expected
    assert ["".join(p) for p in pieces] == expected
    assert all(len(p) > 4 for p in pieces[:2]), "streamed piece by piece, not at the end"
    assert completions[2].finish_reason == "stop" and stop not in completions[2].text
    second_pass = [i for i, event in enumerate(events) if event == "pass"][1]
    assert events.index("text 0") > second_pass < events.index("text 1"), (
        "a streamed row's first piece comes once the step after its token is queued"
    )


class ReaderGone(Exception):
    """What a stream's reader raises in these tests."""


@pytest.mark.parametrize("stop", [(), ("never in the text",)], ids=["streamed", "with-stop"])
def test_a_stream_whose_reader_fails_ends_alone(engine: Engine, stop: tuple[str, ...]) -> None:
    """Its text is decoded after every row is sampled, or, with a stop
    string, inside the row's own sampling: either way the failure is its own."""

    def reader_gone(_: str) -> None:
        raise ReaderGone

    failing = GenerationRequest(PROMPTS[1], replace(greedy("").sampling, stop=stop))
    with engine.together():
        doomed = engine.submit(failing, on_text=reader_gone)
        others = [engine.submit(greedy(prompt)) for prompt in PROMPTS]
    assert isinstance(doomed.exception(timeout=120), ReaderGone)
    alone = [engine.generate([greedy(prompt)])[0] for prompt in PROMPTS]
    assert [future.result(timeout=120) for future in others] == alone


def test_a_stop_string_ends_the_completion_before_it(engine: Engine) -> None:
    full = engine.generate([greedy(PROMPTS[2], 16)])[0].text
    stop = full.strip()[3:6]
    stopped = engine.generate(
        [GenerationRequest(PROMPTS[2], Sampling(16, 0.0, 1.0, stop=(stop,)))]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]
    assert stopped.completion_tokens < 16


def test_a_cancelled_request_is_dropped_mid_flight_and_the_others_go_on(engine: Engine) -> None:
    cancelled_before = engine.stats.cancelled
    started: list[str] = []
    doomed = engine.submit(greedy(PROMPTS[1], 200), on_text=started.append)
    survivor = engine.submit(greedy(PROMPTS[0], 12))
    wait_for(lambda: bool(started))
    assert doomed.cancel()
    assert survivor.result(timeout=120).completion_tokens > 0
    wait_for(lambda: engine.stats.cancelled > cancelled_before)
    assert engine.stats.cancelled == cancelled_before + 1


class HeldAtFirstPiece:
    """An ``on_text`` that holds the decode thread at its stream's first piece
    until released, so a test acts while that sequence is mid-batch."""

    def __init__(self) -> None:
        self.holding, self.release = threading.Event(), threading.Event()

    def __call__(self, _: str) -> None:
        self.holding.set()
        self.release.wait(60)


def one_row_batcher(engine: Engine, kind: type[ContinuousBatcher] = ContinuousBatcher):
    """A batcher of its own over the engine's model, one row at a time, for a
    test that closes it."""
    return kind(engine.model, engine.tokenizer, engine._batcher.eos_token_ids, max_batch_size=1)


@padded_only
def test_closing_finishes_the_batch_in_flight_and_refuses_everything_else(
    engine: Engine,
) -> None:
    batcher = one_row_batcher(engine)
    held = HeldAtFirstPiece()
    in_flight = batcher.submit(greedy(PROMPTS[1]), on_text=held)
    assert held.holding.wait(60)
    queued = [batcher.submit(greedy(prompt)) for prompt in PROMPTS[:2]]  # no room: one row
    closer = threading.Thread(target=batcher.close)
    closer.start()
    wait_for(lambda: not batcher.alive)
    held.release.set()
    closer.join(60)

    assert in_flight.result(timeout=60) == engine.generate([greedy(PROMPTS[1])])[0]
    late = [batcher.submit(greedy(PROMPTS[0])), batcher.between_steps([lambda: None])]
    for refused in queued + late:
        assert isinstance(refused.exception(timeout=10), BatcherClosedError)


@padded_only
def test_closing_refuses_the_queued_at_once_not_after_the_batch_in_flight(
    engine: Engine,
) -> None:
    """The batch in flight may take minutes on a CPU: a caller queued behind
    it learns at once that it will not be served."""
    batcher = one_row_batcher(engine)
    held = HeldAtFirstPiece()
    in_flight = batcher.submit(greedy(PROMPTS[1]), on_text=held)
    assert held.holding.wait(60)
    queued = batcher.submit(greedy(PROMPTS[0]))  # no room: one row
    closer = threading.Thread(target=batcher.close)
    closer.start()
    try:
        assert isinstance(queued.exception(timeout=5), BatcherClosedError)
        assert not in_flight.done()
    finally:
        held.release.set()
        closer.join(60)
    assert in_flight.result(timeout=60) == engine.generate([greedy(PROMPTS[1])])[0]


@padded_only
def test_a_submission_racing_close_still_lets_the_loop_stop(engine: Engine) -> None:
    """close() wakes a loop about to wait for arrivals with an empty one; a
    submission refused meanwhile takes everything queued, that too."""
    about_to_wait, go_on = threading.Event(), threading.Event()

    class PausedBeforeArrivals(ContinuousBatcher):
        def _take_arrivals(self) -> list:
            about_to_wait.set()
            go_on.wait(30)
            return super()._take_arrivals()

    batcher = one_row_batcher(engine, PausedBeforeArrivals)
    assert about_to_wait.wait(30)
    batcher._stopping.set()  # close(), up to its wake-up call ...
    batcher._waiting.put(None)
    refused = batcher.submit(greedy(PROMPTS[0]))  # ... which this refusal takes
    go_on.set()
    assert isinstance(refused.exception(timeout=10), BatcherClosedError)
    batcher._thread.join(30)
    assert not batcher._thread.is_alive(), "the loop waits for an arrival that never comes"


@padded_only
def test_a_loop_that_fails_outside_a_batch_refuses_everything_rather_than_hang(
    engine: Engine,
) -> None:
    failing = threading.Event()

    class FailsBetweenSteps(ContinuousBatcher):
        def _run_chores(self, idle: bool) -> None:
            if failing.is_set():
                raise RuntimeError("a bug outside any one batch")
            super()._run_chores(idle)

    batcher = one_row_batcher(engine, FailsBetweenSteps)
    held = HeldAtFirstPiece()
    running = batcher.submit(greedy(PROMPTS[1]), on_text=held)
    assert held.holding.wait(60)
    waiting = batcher.submit(greedy(PROMPTS[0]))  # no room: one row
    failing.set()
    held.release.set()
    batcher._thread.join(60)
    assert not batcher._thread.is_alive() and not batcher.alive
    late = batcher.submit(greedy(PROMPTS[2]))
    for future in (running, waiting, late):
        assert isinstance(future.exception(timeout=10), BatcherClosedError)


@padded_only
def test_an_arrival_taken_as_the_loop_fails_is_refused_too(engine: Engine) -> None:
    batcher = one_row_batcher(engine)

    def broken(positions: list[int]) -> int:
        raise RuntimeError("a bug while taking arrivals")

    batcher._rows.fitting = broken  # fails once the loop has taken the request
    taken = batcher.submit(greedy(PROMPTS[0]))
    batcher._thread.join(60)
    assert not batcher._thread.is_alive()
    assert isinstance(taken.exception(timeout=10), BatcherClosedError)


@pytest.mark.parametrize(
    ("prompt", "refusal"),
    [((), "has no tokens"), ((10**6,), "outside the model's vocabulary")],
    ids=["no tokens", "a token the model lacks"],
)
def test_a_prompt_no_row_can_decode_is_refused_alone(
    engine: Engine, prompt: tuple[int, ...], refusal: str
) -> None:
    """Submitted straight to the engine, past Engine.request's checks (as a
    notebook or a benchmark may): the running batch decodes on."""
    held = HeldAtFirstPiece()
    running = engine.submit(greedy(PROMPTS[0]), on_text=held)
    assert held.holding.wait(60)
    refused = engine.submit(GenerationRequest(prompt, greedy("").sampling))
    held.release.set()
    with pytest.raises(FieldError, match=refusal) as raised:
        refused.result(timeout=60)
    assert raised.value.field == "prompt"
    assert running.result(timeout=60) == engine.generate([greedy(PROMPTS[0])])[0]


@padded_only
def test_the_probe_fails_while_the_loop_is_stuck_on_one_turn_but_not_while_idle(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "STALLED_AFTER_S", 0.05)
    wait_for(lambda: engine._batcher.stalled_s() == 0.0)  # idle: waiting for work
    time.sleep(0.1)  # idle for longer than a turn may take
    engine.probe()
    stuck, release = threading.Event(), threading.Event()

    def block() -> None:
        stuck.set()
        release.wait(60)

    chore = engine._batcher.between_steps([block], wake=True)
    assert stuck.wait(60)
    wait_for(lambda: engine._batcher.stalled_s() > 0.05)
    with pytest.raises(RuntimeError, match="on one step"):
        engine.probe()
    engine.probe(longest_request_s=3600)  # requests may still be waiting on it
    release.set()
    chore.result(timeout=60)
    wait_for(lambda: engine._batcher.stalled_s() == 0.0)
    engine.probe()


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_probe_passes_on_a_working_engine_and_counts_nothing(engine: Engine) -> None:
    before = engine.stats.forward_passes
    engine.probe()
    assert engine.stats.forward_passes == before


def test_the_probe_fails_when_the_model_gives_non_finite_logits(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = engine.model.forward

    def poisoned(*args, **kwargs):
        output = real_forward(*args, **kwargs)
        output.logits = output.logits * float("nan")
        return output

    monkeypatch.setattr(engine.model, "forward", poisoned)
    with pytest.raises(RuntimeError, match=r"not finite in float32$"):
        engine.probe()
    assert not_finite(torch.bfloat16).endswith(": try DTYPE=float32")
    assert not_finite(torch.float16).endswith(
        ": try DTYPE=float32, or DTYPE=bfloat16 on compute capability 8.0 and up"
    )


def test_loading_reports_where_its_time_went(engine: Engine) -> None:
    times = engine.load_times
    assert times is not None
    parts = (times.imports_s, times.tokenizer_s, times.weights_s, times.warm_up_s)
    assert all(part > 0 for part in parts)
    assert times.total_s == pytest.approx(sum(parts))


def test_a_load_that_fails_after_the_decode_loop_started_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica whose load fails is retried in the same process: each failed
    try must not leave a decode thread holding its model and cache."""

    def failing_probe(self: Engine, longest_request_s: float = 0.0) -> None:
        raise RuntimeError("the warm-up pass failed")

    def decode_loops() -> int:
        return sum(thread.name == "decode-loop" for thread in threading.enumerate())

    monkeypatch.setattr(Engine, "probe", failing_probe)
    before = decode_loops()
    with pytest.raises(RuntimeError, match="warm-up pass failed"):
        Engine.load(EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir, cpu_threads=2)
    assert decode_loops() <= before


def test_greedy_and_sampled_rows_in_one_batch_each_decode_as_alone(engine: Engine) -> None:
    sampled = GenerationRequest(PROMPTS[1], Sampling(10, temperature=0.9, top_p=0.9, seed=7))
    alone = [engine.generate([greedy(PROMPTS[0])])[0], engine.generate([sampled])[0]]
    together = engine.generate([greedy(PROMPTS[0]), sampled])
    assert [c.text for c in together] == [c.text for c in alone]


def test_prepacked_linear_layers_decode_the_text_unpacked_ones_do() -> None:
    """fp32 linear layers (a model without GGUF blocks, or a CPU without their
    kernels) get prepacked for oneDNN (helpers/engine/cpu_linear.py): a speed-up,
    not a change of model.

    The engine prepacks between the steps of the requests after its load,
    and whatever is left once it is idle."""
    assert can_prepack(), "this torch build has no oneDNN: the CPU default is not tested"

    def fp32_engine(prepack: bool) -> Engine:
        cache_dir = ServeConfig.from_env({}).model_cache_dir
        return Engine.load(
            EMBEDDED_MODEL_ID, cache_dir, cpu_threads=2, cpu_weights="float32", prepack=prepack
        )

    packed = fp32_engine(prepack=True)
    packed.generate([greedy(PROMPTS[0], 2)])
    assert packed.tuned is not None
    packed.tuned.result(timeout=120)
    assert any(isinstance(module, PrepackedLinear) for module in packed.model.modules())
    unpacked = fp32_engine(prepack=False)
    assert not any(isinstance(module, PrepackedLinear) for module in unpacked.model.modules())
    requests = [greedy(prompt, 24) for prompt in PROMPTS]
    assert [c.text for c in packed.generate(requests)] == [
        c.text for c in unpacked.generate(requests)
    ]


def test_work_between_steps_takes_one_step_boundary_a_piece_and_its_failure_stays_contained(
    engine: Engine,
) -> None:
    """A replica that starts under load never idles, so its prepacking runs in
    pieces between decode steps instead (helpers/engine/cpu_linear.py)."""
    steps: list[int] = []
    after_failure: list[int] = []
    chores: list[Future[None]] = []

    def queue_chores(_: str) -> None:  # on the decode thread, mid-sequence
        if not chores:
            piece = lambda: steps.append(engine.stats.forward_passes)  # noqa: E731
            chores.append(engine.between_steps([piece] * 3))
            chores.append(engine.between_steps([lambda: 1 / 0, lambda: after_failure.append(1)]))

    in_flight = engine.submit(greedy(PROMPTS[1], 24), queue_chores)
    assert in_flight.result(timeout=120).completion_tokens == 24
    assert len(chores) == 2, "the stream never emitted text"
    chores[0].result(timeout=60)
    assert len(steps) == 3 and steps[0] < steps[1] < steps[2]  # one piece a step
    with pytest.raises(ZeroDivisionError):
        chores[1].result(timeout=60)
    assert after_failure == []
    assert engine.generate([greedy(PROMPTS[0], 2)])[0].completion_tokens == 2


@padded_only
def test_an_idle_loops_chores_give_way_to_a_request_between_two_pieces(engine: Engine) -> None:
    """Chores an idle loop runs back to back (scoring an echoed prompt,
    prepacking) stop running so when a request arrives: it waits for one
    piece, not for all of them, and is answered before the chore's last."""
    holding, release = threading.Event(), threading.Event()
    request: list[Future[Completion]] = []
    answered_first: list[bool] = []

    def first() -> None:
        holding.set()
        release.wait(60)

    def last() -> None:
        answered_first.append(request[0].done())

    chore = engine._batcher.between_steps([first, *[lambda: None] * 18, last], wake=True)
    assert holding.wait(60)
    request.append(engine.submit(greedy(PROMPTS[0], 2)))
    release.set()
    chore.result(timeout=60)
    assert answered_first == [True], "the request waited for every piece of the chore"
    assert request[0].result(timeout=60).completion_tokens == 2
