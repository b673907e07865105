"""Prompts go into the padded layout's batch a piece per pass (``Prefill``),
each piece riding the running rows' decode step: a long prompt never holds
those rows for more than one piece, and every row's text is what one
prefill pass would give."""

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from helpers.config import EMBEDDED_MODEL_ID
from helpers.engine.decoder import Segment
from helpers.engine.engine import Engine, GenerationRequest, Sampling
from helpers.engine.padded_rows import PaddedRows
from helpers.engine.prefill_lanes import LONG_PROMPT_PASSES

from .conftest import padded_only

CHUNK = 16
"""Prompt tokens a pass of the engine under test prefills: small, so the
prompts here take several pieces."""
SHORT = "The capital of France is"
LONG = "Ray Serve scales replicas up and down with the traffic they get. " * 6


def greedy(prompt: str, max_new_tokens: int) -> GenerationRequest:
    sampling = Sampling(max_new_tokens, temperature=0.0, top_p=1.0, ignore_eos=True)
    return GenerationRequest(prompt, sampling)


@pytest.fixture
def chunked(engine: Engine) -> Iterator[Engine]:
    """The padded engine's model behind a batcher that prefills ``CHUNK``
    tokens a pass."""
    cut = Engine(engine.model, engine.tokenizer, model_id=EMBEDDED_MODEL_ID, prefill_chunk=CHUNK)
    yield cut
    cut.close()


def wait_until_asleep(engine: Engine) -> None:
    """Until the decode loop waits for work: chores queued then run only once
    a request has woken it."""
    deadline = time.monotonic() + 60
    while engine._batcher.stalled_s() != 0.0:
        assert time.monotonic() < deadline, "the decode loop never went idle"
        time.sleep(0.01)


@contextlib.contextmanager
def passes(model: Any) -> Iterator[list[tuple[int, int]]]:
    """For each forward pass ``model`` runs inside the block: the rows it
    decoded and the prompt tokens it prefilled (segments that keep one
    logit a row are prefills; a decode step keeps them all)."""
    seen: list[tuple[int, int]] = []
    forward = model.forward_segments

    def recorded(segments: list[Segment]) -> list[torch.Tensor]:
        decoded = sum(len(s.input_ids) for s in segments if s.logits_to_keep == 0)
        prefilled = sum(s.input_ids.numel() for s in segments if s.logits_to_keep == 1)
        seen.append((decoded, prefilled))
        return forward(segments)

    model.forward_segments = recorded
    try:
        yield seen
    finally:
        del model.forward_segments


@padded_only
def test_a_prefill_in_pieces_leaves_the_rows_one_pass_would(engine: Engine) -> None:
    """Two prompts of different lengths (so one is left-padded), in pieces of
    one, three and five columns and the rest: the same logits, mask and
    positions as one pass, and the same greedy tokens after."""
    ids = [engine.tokenizer(text)["input_ids"] for text in (SHORT, LONG)]
    whole, cut = (PaddedRows(engine.model, engine.tokenizer) for _ in range(2))
    with torch.inference_mode():
        whole.admit(ids, [len(i) + 8 for i in ids])
        prefill = cut.prefill(ids)
        for columns in (1, 3, 5, prefill.left - 9):
            assert prefill.lengths is None
            cut.decode([], [(prefill, columns)])
        assert prefill.lengths == [len(i) for i in ids]
        (mine,), (theirs,) = cut.groups, whole.groups
        assert torch.equal(mine.mask, theirs.mask)
        assert torch.equal(mine.positions, theirs.positions)
        torch.testing.assert_close(cut.logits, whole.logits, rtol=1e-4, atol=1e-4)
        for _ in range(8):
            step = [rows.logits.argmax(-1).tolist() for rows in (whole, cut)]
            assert step[0] == step[1]
            whole.decode(step[0])
            cut.decode(step[1])


@padded_only
def test_a_long_prompt_goes_in_a_piece_per_step_and_both_complete_as_alone(
    engine: Engine, chunked: Engine
) -> None:
    """The running row decodes a token in every pass the long prompt takes,
    no pass prefills more than the chunk, and both texts are what the
    default engine (one pass for this prompt) gives each alone."""
    alone = [engine.generate([greedy(p, 24)])[0].text for p in (SHORT, LONG)]
    prompt_tokens = len(engine.tokenizer(LONG)["input_ids"])
    split = chunked.stats.split_prefills
    box: list = []

    def on_text(piece: str) -> None:
        if not box:
            box.append(chunked.submit(greedy(LONG, 24)))

    with passes(chunked.model) as seen:
        first = chunked.submit(greedy(SHORT, 24), on_text)
        texts = [first.result(timeout=120).text, box[0].result(timeout=120).text]
    assert texts == alone
    assert max(prefilled for _, prefilled in seen) <= CHUNK
    riding = [decoded for decoded, prefilled in seen if decoded and prefilled]
    assert len(riding) >= prompt_tokens // CHUNK, "the long prompt rode the running row's steps"
    assert chunked.stats.split_prefills == split + 1


@padded_only
def test_a_request_cancelled_while_its_prompt_goes_in_is_dropped_before_it_is_all_in(
    chunked: Engine,
) -> None:
    """Counted as a row while it goes in, so the batch's room and the
    replica's gauges see it; once its caller is gone no more of it is run."""
    before = chunked.stats
    cancelled, sequences = before.cancelled, before.sequences
    pieces: list[str] = []
    doomed: list = []
    loads: list = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            doomed.append(chunked.submit(greedy(LONG, 8)))
        if len(pieces) == 4:
            loads.append(chunked._batcher.batch_load())
            assert doomed[0].cancel()

    with passes(chunked.model) as seen:
        survivor = chunked.submit(greedy(SHORT, 24), on_text)
        assert survivor.result(timeout=120).completion_tokens == 24
    assert loads[0].rows == 2 and loads[0].waiting == 0
    assert chunked.stats.cancelled == cancelled + 1
    assert chunked.stats.sequences == sequences + 1, "only the survivor joined the rows"
    prompt_tokens = len(chunked.tokenizer(LONG)["input_ids"])
    assert sum(prefilled for _, prefilled in seen) < prompt_tokens


@padded_only
def test_a_pass_that_fails_while_a_prompt_goes_in_fails_it_too_and_the_loop_goes_on(
    chunked: Engine,
) -> None:
    model = chunked.model
    forward, calls = model.forward_segments, []

    def fails_in_the_second_piece(segments: list[Segment]) -> list[torch.Tensor]:
        calls.append(sum(1 for s in segments if s.logits_to_keep == 1))
        if calls.count(1) == 2 and len(segments) == 2:
            raise RuntimeError("a failing pass")
        return forward(segments)

    box: list = []

    def on_text(piece: str) -> None:
        if not box:
            box.append(chunked.submit(greedy(LONG, 8)))

    model.forward_segments = fails_in_the_second_piece
    try:
        running = chunked.submit(greedy(SHORT, 24), on_text)
        assert str(running.exception(timeout=120)) == "a failing pass"
        assert str(box[0].exception(timeout=120)) == "a failing pass"
    finally:
        del model.forward_segments
    assert chunked._batcher.batch_load().rows == 0
    assert chunked.generate([greedy(SHORT, 4)])[0].completion_tokens == 4


@padded_only
def test_a_batch_that_starts_gets_its_first_token_before_any_chore(chunked: Engine) -> None:
    """Chores wait for a starting batch's first step (prepacking must not
    delay a cold start's first token): none runs between the pieces of a
    prompt that goes into an empty batch, nor between its last piece and
    its first token."""
    events: list[str] = []
    wait_until_asleep(chunked)
    chores = chunked.between_steps([lambda: events.append("chore")] * 3)
    request = chunked.submit(greedy(LONG, 4), on_text=lambda _: events.append("text"))
    assert request.result(timeout=120).completion_tokens == 4
    chores.result(timeout=60)
    assert events[0] == "text", events
    assert chunked.stats.split_prefills >= 1


@padded_only
def test_once_the_first_tokens_are_out_chores_run_between_pieces_again(chunked: Engine) -> None:
    """Chores wait for a starting batch's first tokens only: a steady load of
    long one-token prompts (a classifier, a judge) leaves no row decoding
    while the next prompt goes in, and must not hold back prepacking or an
    echoed prompt's scoring for as long as it lasts."""
    events: list[str] = []
    wait_until_asleep(chunked)
    chores = chunked.between_steps([lambda: events.append("chore")] * 3)
    second: list = []
    model = chunked.model
    forward = model.forward_segments

    def submit_the_second_in_the_first_pass(segments: list[Segment]) -> list[torch.Tensor]:
        if not second:  # on the decode thread: taken as a group of its own next turn
            second.append(
                chunked.submit(
                    greedy(LONG + "Again.", 1), on_text=lambda _: events.append("second")
                )
            )
        return forward(segments)

    model.forward_segments = submit_the_second_in_the_first_pass
    try:
        first = chunked.submit(greedy(LONG, 1), on_text=lambda _: events.append("first"))
        first.result(timeout=120)
        second[0].result(timeout=120)
    finally:
        del model.forward_segments
    chores.result(timeout=60)
    assert events.index("first") < events.index("chore") < events.index("second"), events


@padded_only
def test_a_short_prompt_behind_a_long_one_gets_its_first_token_before_it(
    engine: Engine, chunked: Engine
) -> None:
    """A short prompt submitted while a long one goes in does not wait for
    all of it: it goes in beside the long one's next piece, and both texts
    are what each gives alone."""
    alone = [engine.generate([greedy(p, 8)])[0].text for p in (LONG, SHORT)]
    assert len(engine.tokenizer(LONG)["input_ids"]) > LONG_PROMPT_PASSES * CHUNK, "a long one"
    order: list[str] = []
    behind: list = []
    model = chunked.model
    forward = model.forward_segments

    def submit_the_short_in_the_first_pass(segments: list[Segment]) -> list[torch.Tensor]:
        if not behind:  # on the decode thread: taken as a group of its own next turn
            behind.append(chunked.submit(greedy(SHORT, 8), on_text=lambda _: order.append("short")))
        return forward(segments)

    model.forward_segments = submit_the_short_in_the_first_pass
    try:
        first = chunked.submit(greedy(LONG, 8), on_text=lambda _: order.append("long"))
        texts = [first.result(timeout=120).text, behind[0].result(timeout=120).text]
    finally:
        del model.forward_segments
    assert texts == alone
    assert order.index("short") < order.index("long"), order


@padded_only
def test_rows_of_very_different_lengths_go_in_groups_and_decode_as_alone(
    engine: Engine, chunked: Engine
) -> None:
    """A long prompt joins a short running row in a group of its own; a
    question sent once it is in joins the short row's group, before the
    long row; every text is what each gives alone."""
    prompts = {SHORT: 24, LONG: 8, "Write a haiku about Ray Serve.": 12}
    alone = [engine.generate([greedy(p, n)])[0].text for p, n in prompts.items()]
    rows = chunked._batcher._rows
    add, joins = rows._add_rows, []

    def recorded_add(*args: Any) -> int:  # on the decode thread
        at = add(*args)
        joins.append((at, len(args[0].mask), rows.rows, len(rows.groups)))
        return at

    box: list = []

    def submit_after(stream: int) -> Callable[[str], None]:
        """Once stream ``stream`` has text, the next prompt is submitted."""

        def on_text(piece: str) -> None:
            if len(box) == stream < len(prompts) - 1:
                prompt = list(prompts)[stream + 1]
                next_one = greedy(prompt, prompts[prompt])
                box.append(chunked.submit(next_one, on_text=submit_after(stream + 1)))

        return on_text

    rows._add_rows = recorded_add
    try:
        first = chunked.submit(greedy(SHORT, 24), on_text=submit_after(0))
        texts = [first.result(timeout=120).text]
        texts += [box[0].result(timeout=120).text, box[1].result(timeout=120).text]
    finally:
        del rows._add_rows
    assert texts == alone
    (_, _, _, one), (_, _, _, two), (at, joined, total, groups) = joins
    assert (one, two, groups) == (1, 2, 2), "the long row apart, the question with the short"
    assert at + joined < total, "the question went in before the long row"


@padded_only
def test_a_question_admitted_with_a_long_prompt_goes_in_apart_and_gets_its_first_token_first(
    engine: Engine, chunked: Engine
) -> None:
    """Admitted in one step (a burst queued during a cold start), they are
    not padded to one length: the question is a prefill of its own, in the
    short lane, and its text comes passes before the long prompt's; both
    texts are what each gives alone."""
    prompts = (LONG, SHORT)
    alone = [engine.generate([greedy(p, 8)])[0].text for p in prompts]
    prefills = chunked.stats.prefills
    first_text: dict[str, int] = {}
    with passes(chunked.model) as seen:

        def on_text(prompt: str) -> Callable[[str], None]:
            return lambda _: first_text.setdefault(prompt, len(seen))

        with chunked.together():
            futures = [chunked.submit(greedy(p, 8), on_text(p)) for p in prompts]
        texts = [future.result(timeout=120).text for future in futures]
    assert texts == alone
    assert chunked.stats.prefills == prefills + 2, "a prefill each"
    assert first_text[SHORT] < first_text[LONG], first_text


@padded_only
def test_prefills_of_one_step_that_end_in_one_pass_join_where_the_rows_put_them(
    engine: Engine, chunked: Engine
) -> None:
    """Beside a running row, a one-token prompt and an eight-token one
    admitted in one step are two prefills, both in by the same pass: the
    first starts a group of its own, the second joins the running row's
    group, before the first. Every text is what each gives alone."""
    prompts = {SHORT: 24, "Hi": 8, "Write a haiku about Ray Serve.": 8}
    alone = [engine.generate([greedy(p, n)])[0].text for p, n in prompts.items()]
    rows = chunked._batcher._rows
    add, joins = rows._add_rows, []
    box: list = []

    def submit_both(piece: str) -> None:  # on the decode thread
        if not box:
            with chunked.together():
                box.extend(chunked.submit(greedy(p, n)) for p, n in list(prompts.items())[1:])

    with passes(chunked.model) as seen:

        def recorded_add(*args: Any) -> int:
            at = add(*args)
            joins.append((len(seen), at))
            return at

        rows._add_rows = recorded_add
        try:
            first = chunked.submit(greedy(SHORT, 24), on_text=submit_both)
            texts = [first.result(timeout=120).text] + [f.result(timeout=120).text for f in box]
        finally:
            del rows._add_rows
    assert texts == alone
    (_, running), (one, hi), (other, haiku) = joins
    assert one == other, "both prefills ended in the same pass"
    assert (running, hi, haiku) == (0, 1, 1), "the haiku went in before the one-token prompt"
