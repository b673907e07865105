"""Continuous batching: sequences join and leave the running batch at every step.

With static batching (gather requests, decode them all, return them all) a
request that arrives while a batch runs waits for the whole batch to finish,
and a batch keeps computing rows that already ended, so under load most
requests wait while few decode. Here one thread owns the model and loops:
sample one token for every row, drop the rows that ended, and run one decode
step for the rest, in which the sequences that arrived meanwhile are
prefilled too, a piece of at most ``prefill_chunk`` prompt tokens a step
(one pass for both; their KV cache joins the running batch after their last
piece): a long prompt then holds the running rows for one piece at a time,
not for all of it, and a short one sent behind it goes in beside its pieces
(:mod:`helpers.engine.prefill_lanes`). Arrivals get prefill passes of their
own first where the layout cannot fold them into a decode step: the paged
layout, whose steps have fixed shapes, and any model that is not the kit's
decoder (transformers' models).

The batch's tensors are kept by :mod:`helpers.engine.batch_rows`.
``PaddedRows`` (CPU, and transformers' models anywhere) left-pads rows of
about one length together, in groups, each row's attention mask hiding its
padding and its position ids counting its real tokens only; a row's place
among the rows is where its sequence stands in the batch. ``PagedRows``
(the kit's decoder on a GPU, or anywhere when asked) gives each sequence a
slot of a paged cache and the pages it holds. Either way a sequence decodes
the same whichever rows it shares the batch with.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from helpers.engine.decoder import Decoder, SlotDecoder
from helpers.engine.grammar import CompiledGrammar, Grammars, MaskWorker
from helpers.engine.padded_rows import PREFILL_CHUNK, ROW_GROUPS, PaddedRows, Prefill
from helpers.engine.paged_rows import PagedRows
from helpers.engine.prefill_lanes import plan_pass
from helpers.engine.sampling import Sampler
from helpers.engine.text_stream import TextStream
from helpers.protocol import (
    BatcherClosedError,
    Completion,
    FieldError,
    PromptTooLongError,
    Sampling,
    Timing,
    TokenIdError,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

TextCallback = Callable[[str], None]
"""Receives each piece of new text, on the decode thread; it must not block."""
LogprobCallback = Callable[[TokenLogprob], None]
"""Receives each token's log probability entry as the token is decoded (its
text may come in a later piece), on the decode thread; it must not block."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, formatted for the model (text, or token ids as a tuple),
    and how to sample its completion."""

    prompt: str | tuple[int, ...]
    sampling: Sampling
    grammar: CompiledGrammar | None = field(default=None, compare=False)
    """``sampling.grammar`` compiled (:meth:`Engine.request` does it while it
    checks the request); the batcher compiles it where it is left out."""
    prompt_ids: tuple[int, ...] | None = field(default=None, compare=False)
    """The prompt tokenized, once, where :meth:`Engine.request` checked its
    length; the batcher tokenizes where it is left out."""

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids, tokenized with ``tokenizer`` unless known already."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids)
        return prompt_token_ids(tokenizer, self.prompt)


def prompt_token_ids(tokenizer: Any, prompt: str | tuple[int, ...]) -> list[int]:
    """A prompt's token ids: tokenized text, or the ids it came as."""
    return list(prompt) if isinstance(prompt, tuple) else tokenizer(prompt)["input_ids"]


def check_vocabulary(field: str, tokens: Sequence[int], vocabulary: int) -> None:
    """Raise :class:`~helpers.protocol.TokenIdError` naming ``field`` for the
    first of ``tokens`` the model has no embedding or logit for."""
    outside = [token for token in tokens if not 0 <= token < vocabulary]
    if outside:
        raise TokenIdError(
            field,
            f"{field}: token id {outside[0]} is outside the model's vocabulary "
            f"(0 to {vocabulary - 1})",
        )


@dataclass
class BatchStats:
    """Counters a test or a metric can read to see batching at work."""

    sequences: int = 0
    prefills: int = 0
    """Prefills that joined the rows: one per group of prompts admitted
    together, split by length where prompts go in a piece per decode step
    (the kit's decoder in the padded layout: ``length_groups``)."""
    folded_prefills: int = 0
    """Prefills whose last piece rode along a decode step rather than taking a pass of its own."""
    split_prefills: int = 0
    """Prefills that rode more than one decode step, a piece each (a long
    prompt, or many at once); prefills in passes of their own (the paged
    layout, transformers' models) are counted in ``forward_passes`` only."""
    forward_passes: int = 0
    generated_tokens: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    shared_prefills: int = 0
    """Rows that copied the prefill of an identical prompt admitted with them
    (a request's ``n`` choices) instead of computing their own."""
    reused_prompt_tokens: int = 0
    """Prompt tokens whose keys and values came from an ended row's cache
    (:mod:`helpers.engine.prefix_cache`), counted once per sequence."""


@dataclass(frozen=True)
class BatchLoad:
    """How busy the batcher is at one moment, for a replica's gauges."""

    waiting: int
    """Sequences submitted and not yet in the batch."""
    rows: int
    """Sequences in the running batch, or on their way in (prefilling)."""
    cached_tokens: int
    """Positions the running rows hold in the KV cache (prompt and output)."""


@dataclass
class _Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    future: Future[Completion]
    sampler: Sampler
    text: TextStream
    on_text: TextCallback | None
    on_logprob: LogprobCallback | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def emit(self, delta: str) -> None:
        if delta and self.on_text is not None:
            self.on_text(delta)

    def add_logprob(self, logprob: TokenLogprob) -> None:
        self.logprobs.append(logprob)
        if self.on_logprob is not None:
            self.on_logprob(logprob)


@dataclass(eq=False)
class _Prefilling:
    """Sequences admitted in one step and prefilled together (grouped by
    length: :func:`~helpers.engine.padded_rows.length_groups`), a piece a pass."""

    sequences: list[_Sequence]
    prefill: Prefill
    pieces: int = 0


@dataclass
class _Chore:
    """Work for the decode thread, cut into pieces that each fit between two steps."""

    pieces: list[Callable[[], None]]
    done: Future[None]
    ran: int = 0

    def run_piece(self) -> bool:
        """Run the next piece; True once the chore has ended and ``done`` is
        resolved: its last piece ran, or one raised and the rest are dropped."""
        if self.ran < len(self.pieces):
            try:
                self.pieces[self.ran]()
            except Exception as err:  # the model stays as the pieces before left it
                _settle(self.done, exception=err)
                return True
            self.ran += 1
        if self.ran < len(self.pieces):
            return False
        _settle(self.done)
        return True


class ContinuousBatcher:
    """Owns the model on one thread; other threads submit and await futures."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_batch_size: int,
        slots: bool | None = None,
        max_positions: int | None = None,
        pages: int | None = None,
        prefill_area: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        long_prompt_tokens: int | None = None,
        row_groups: int = ROW_GROUPS,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """``slots`` picks the batch's layout (:mod:`helpers.engine.batch_rows`): by
        default slots of a paged cache replayed as CUDA graphs for a model
        that offers one on a GPU, else a padded cache; True asks for slots
        anywhere (on CPU, as tests do, they run eagerly). ``max_positions`` (by default the
        model's context) caps a sequence's length in slots, ``pages``
        fixes their cache's size and ``prefill_area`` their prefill passes'.
        ``prefill_chunk`` is how many prompt tokens one pass of the padded
        layout prefills beside the running rows' decode step, and a prompt
        of more than ``long_prompt_tokens`` (by default four passes' worth)
        lets shorter ones go in beside it (:func:`plan_pass`); 0 serves
        prefills first come, first served. ``row_groups`` is how many groups
        of rows of different lengths the padded layout keeps apart; 1 pads
        them all to one length. ``prefix_cache_bytes`` is how much of its
        ended rows' cache the padded layout keeps for prompts that start the
        same way (:mod:`helpers.engine.prefix_cache`); 0 keeps none. Slots
        keep the full pages of their sequences while no new one needs them
        (:mod:`helpers.engine.page_index`) wherever it is above 0."""
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max_batch_size
        self.stats = BatchStats()
        self.grammars = Grammars(tokenizer, model.config.vocab_size, sorted(eos_token_ids))
        self._masks = MaskWorker()
        has_slots = isinstance(model, SlotDecoder)
        if slots and not has_slots:
            raise ValueError("slots need a SlotDecoder, such as the kit's own Llama")
        on_gpu = model.device.type == "cuda" and has_slots
        if slots or (slots is None and on_gpu):
            self._rows: PaddedRows | PagedRows = PagedRows(
                model,
                tokenizer,
                max_batch_size,
                graphs=on_gpu,
                max_positions=max_positions or model.config.max_position_embeddings,
                pages=pages,
                prefill_area=prefill_area,
                keeps_prefixes=prefix_cache_bytes > 0,
            )
        else:
            self._rows = PaddedRows(model, tokenizer, row_groups, prefix_cache_bytes)
        self.prefill_chunk = prefill_chunk
        self.long_prompt_tokens = long_prompt_tokens
        self._sequences: list[_Sequence] = []
        # Admitted, oldest first, not yet rows: their prompts go in piece by piece.
        self._prefilling: list[_Prefilling] = []
        # Taken from the queue, waiting for room in the cache; oldest first.
        self._held: list[_Sequence] = []
        # Admitted this turn, not yet prefilling or rows: until _advance makes
        # them prefills, or while their passes of their own run (_admit_apart:
        # layouts that do not fold prefills into decode steps).
        self._admitting: list[_Sequence] = []
        # torch's CPU thread count is per thread: carry the caller's setting over.
        self._threads = torch.get_num_threads()
        self._waiting: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._new_chores: queue.SimpleQueue[_Chore] = queue.SimpleQueue()
        self._chores: collections.deque[_Chore] = collections.deque()  # decode thread only
        self._stopping = threading.Event()
        self._turn_started: float | None = None  # see stalled_s
        # Woken from idle, until the batch's first tokens are sampled: chores wait.
        self._starting = False
        # Held while a group is submitted, and while the loop takes arrivals.
        self._arriving = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()
        # A daemon thread killed inside torch at exit aborts the interpreter
        # noisily; stopping it first lets the process end cleanly.
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the loop once the batch in flight has finished. Whatever else
        was submitted, or is submitted later, is refused with
        :class:`BatcherClosedError` rather than left waiting for ever."""
        self._stopping.set()
        self._refuse_waiting()  # now, not once the batch in flight ends; wakes the loop too
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # the hook stops it at exit, as it was registered to
            logger.warning(
                "the decode loop is still running 30 s after close(): its batch in flight "
                "has not finished; close() waits for it again at exit"
            )
            return
        atexit.unregister(self.close)  # else it holds the model until exit

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def alive(self) -> bool:
        """False once the decode loop has ended: nothing submitted would resolve."""
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(
        self,
        request: GenerationRequest,
        on_text: TextCallback | None = None,
        on_logprob: LogprobCallback | None = None,
    ) -> Future[Completion]:
        """Queue a request; cancelling the future drops it at the next step.

        ``on_text`` streams the completion: it gets each piece of text as soon
        as it is final, and all of them before the future resolves;
        ``on_logprob`` gets each token's entry, when the request asked for
        log probabilities.
        """
        future: Future[Completion] = Future()
        # Tokenized by Engine.request, or here on the caller's thread; never on
        # the decode thread.
        prompt_ids = request.token_ids(self.tokenizer)
        try:
            self._check_admissible(prompt_ids, request.sampling)
        except ValueError as err:  # refused alone: on the decode thread, it would end the batch
            future.set_exception(err)
            return future
        grammar = request.grammar
        if grammar is None and request.sampling.grammar is not None:
            grammar = self.grammars.compile(request.sampling.grammar)
        constraint = None if grammar is None else grammar.constraint()
        sampler = Sampler(request.sampling, self.device, prompt_ids, constraint)
        # Decoding every token costs a little per row per step; only a stream
        # or a stop string needs it.
        text = TextStream(self.tokenizer, request.sampling.stop, incremental=on_text is not None)
        sequence = _Sequence(request, prompt_ids, future, sampler, text, on_text, on_logprob)
        self._waiting.put(sequence)
        if self._stopping.is_set():  # the loop may have drained the queue already
            self._refuse_waiting()
        return future

    def _check_admissible(self, prompt_ids: list[int], sampling: Sampling) -> None:
        """Raise unless a row can decode this prompt: it has tokens, each one
        the model embeds, and they fit the cache with the new tokens."""
        if not prompt_ids:
            raise FieldError("prompt", "prompt: it has no tokens; a completion needs one or more")
        check_vocabulary("prompt", prompt_ids, self.model.config.vocab_size)
        limit, needed = self._rows.max_positions, len(prompt_ids) + sampling.max_new_tokens
        if limit is not None and needed > limit:
            raise PromptTooLongError(
                f"prompt tokens plus max_new_tokens ({needed}) exceed "
                f"the {limit} positions a sequence may have in this cache"
            )

    def batch_load(self) -> BatchLoad:
        """The load, read from another thread without a lock: the decode
        thread replaces its lists of sequences rather than changing them in
        place. A sequence moving on may be counted twice, never missed."""
        # Read in the order sequences move (held, admitting, prefilling,
        # rows): the decode thread adds each to its next list before it
        # leaves the one before.
        waiting = self._waiting.qsize() + len(self._held)
        admitting, prefilling = self._admitting, self._prefilling
        sequences = self._sequences
        going_in = len(admitting) + sum(len(p.sequences) for p in prefilling)
        return BatchLoad(
            waiting=waiting,
            rows=len(sequences) + going_in,
            cached_tokens=sum(s.prompt_tokens + len(s.text.tokens) for s in sequences),
        )

    def together(self) -> AbstractContextManager[object]:
        """Requests submitted inside this block join the batch in the same
        step (where it has room for them all), so identical prompts, a
        request's ``n`` choices, share one prefill."""
        return self._arriving

    def between_steps(
        self, pieces: Sequence[Callable[[], None]], wake: bool = False
    ) -> Future[None]:
        """Run ``pieces`` in order on the decode thread: one between two decode
        steps while sequences decode, all that are left once the engine is
        idle. Resolves when the last has run, or with the error of the first
        that raised (the pieces after it are dropped). A loop asleep, with
        nothing submitted, starts them after the next request's first step,
        so that request's first token never waits for them; with ``wake``
        (work a caller waits for) it starts them at once.

        Why pieces: work queued for an idle moment never runs on a replica
        that starts under load and stays busy, while running it all at once
        would stall every sequence in the batch. A piece that changes the
        model (swapping a layer) is safe here on CPU: the batch's forward
        passes run on this thread, so none runs meanwhile, and the health
        probe's pass, on a thread of its own, meets the old layer or the new
        one, each swap being one assignment. Not on a GPU, where captured
        CUDA graphs keep the old weights' addresses.
        """
        done: Future[None] = Future()
        self._new_chores.put(_Chore(list(pieces), done))
        if wake:
            self._waiting.put(None)  # an empty arrival: the loop goes round once
        if self._stopping.is_set():
            self._refuse_waiting()
        return done

    def stalled_s(self) -> float:
        """Seconds the loop has spent on its current turn (a step, a prefill, a
        chore); 0 while it waits for work. Read from another thread, it tells a
        health check a loop stuck mid-step from one with nothing to do."""
        started = self._turn_started
        return 0.0 if started is None else time.monotonic() - started

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            self._loop()
        finally:
            # Closed, or the loop itself failed outside any one batch: nothing
            # submitted may then wait for ever, and nothing more is taken.
            self._stopping.set()
            ended = self._sequences + self._entering() + self._held
            self._sequences, self._prefilling, self._held = [], [], []
            for sequence in ended:
                _settle(sequence.future, exception=BatcherClosedError())
            while self._chores:
                _settle(self._chores.popleft().done, exception=BatcherClosedError())
            self._refuse_waiting()

    def _loop(self) -> None:
        while not (self._stopping.is_set() and not self._sequences and not self._prefilling):
            self._turn_started = time.monotonic()
            if self._idle():  # nothing starting, whatever emptied the batch
                self._starting = False
            if not self._starting:
                self._run_chores(idle=self._idle() and not self._held and self._waiting.empty())
            # Once stopping, only the batch in flight goes on.
            arrivals = [] if self._stopping.is_set() else self._take_arrivals()
            try:
                with torch.inference_mode():
                    self._advance(arrivals)
            except Exception as err:  # never let one bad batch kill the loop
                for sequence in self._sequences + self._entering() + arrivals:
                    _settle(sequence.future, exception=err)
                self._sequences, self._prefilling, self._admitting = [], [], []
                self._rows.clear()

    def _idle(self) -> bool:
        """Whether no sequence decodes or is on its way in."""
        return not self._sequences and not self._prefilling

    def _entering(self) -> list[_Sequence]:
        """The sequences whose prompts are being prefilled."""
        return [sequence for prefilling in self._prefilling for sequence in prefilling.sequences]

    def _refuse_waiting(self) -> None:
        """Settle everything queued for a loop that is stopping. Safe from any
        thread: each queued item is taken, and settled, by one caller."""
        while True:
            try:
                sequence = self._waiting.get_nowait()
            except queue.Empty:
                break
            if sequence is not None:
                _settle(sequence.future, exception=BatcherClosedError())
        while True:
            try:
                chore = self._new_chores.get_nowait()
            except queue.Empty:
                break
            _settle(chore.done, exception=BatcherClosedError())
        if threading.current_thread() is not self._thread:
            # What was taken may have been close()'s wake-up call to a loop
            # waiting for arrivals: it is sent again.
            self._waiting.put(None)

    def _run_chores(self, idle: bool) -> None:
        """Between two steps: one piece of the oldest chore, or, when nothing
        decodes or waits, pieces until something arrives (a request, close())."""
        while True:
            try:
                self._chores.append(self._new_chores.get_nowait())
            except queue.Empty:
                break
        while self._chores:
            if self._chores[0].run_piece():
                self._chores.popleft()
            if not idle or not self._waiting.empty() or self._stopping.is_set():
                return
            self._turn_started = time.monotonic()  # a piece done is progress

    def _take_arrivals(self) -> list[_Sequence]:
        """Waiting sequences that fit, oldest first; blocks only when nothing
        is running or held. A sequence the rows have no room for yet is held,
        and the ones after it wait behind it, so none is passed over for
        long. One the rows could never hold is admitted alone, to be refused."""
        room = self.max_batch_size - len(self._sequences) - len(self._entering())
        arrivals: list[_Sequence | None] = list(self._held)
        if self._idle() and not arrivals:
            self._turn_started = None  # waiting for work is not being stuck
            arrivals.append(self._waiting.get())
            self._starting = True
            self._turn_started = time.monotonic()
        with self._arriving:
            while len(arrivals) < room:
                try:
                    arrivals.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
        live = [s for s in arrivals if s is not None and not s.future.cancelled()]
        self.stats.cancelled += sum(1 for s in arrivals if s is not None) - len(live)
        self._held = live  # taken from the queue: if the loop fails now, they are settled
        fits = self._rows.fitting([_positions(s) for s in live[:room]])
        if live and self._idle():
            fits = max(fits, 1)
        self._admitting = live[:fits]  # before they leave the held: see batch_load
        self._held = live[fits:]
        return live[:fits]

    def _advance(self, arrivals: list[_Sequence]) -> None:
        """One iteration: admit, sample a token per row, retire ended rows, decode.

        Where the rows fold prefills (``folds_prefills``), arrivals are
        prefilled a piece per pass, beside the running rows' decode step
        (:meth:`_pieces`), and join the rows with their last piece; otherwise
        they are prefilled first, in passes of their own.
        """
        if arrivals and self._rows.folds_prefills:
            assert isinstance(self._rows, PaddedRows)
            prefills = self._rows.prefills_by_length([s.prompt_ids for s in arrivals])
            entering = [_Prefilling([arrivals[i] for i in group], p) for group, p in prefills]
            for prefilling in entering:
                for sequence in prefilling.sequences:
                    sequence.cached_tokens = prefilling.prefill.start
                    self.stats.reused_prompt_tokens += sequence.cached_tokens
            self._prefilling = [*self._prefilling, *entering]  # replaced: see batch_load
            self._admitting = []
        elif arrivals:
            self._admit_apart(arrivals)
        self._drop_cancelled_prefills()
        if self._idle():
            return
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._sequences))
        keep, next_tokens, pushed = [], [], []
        if self._sequences:
            keep, next_tokens, pushed = self._sample_rows()
            self._starting = False  # its first tokens are out: chores may go on
        if not keep:
            self._sequences = []
            self._rows.clear()
            if not self._prefilling:
                return
        elif len(keep) < len(self._sequences):
            self._sequences = [self._sequences[row] for row in keep]
            self._rows.keep(keep)
        # The kept rows' next masks, computed while the step below runs.
        self._masks.start([s.sampler.constraint for s in self._sequences if s.sampler.constraint])
        runs_ahead = self._rows.step_runs_ahead()
        if not runs_ahead:
            _stream_text(pushed)
        pieces = self._pieces()
        if pieces:
            assert isinstance(self._rows, PaddedRows)
            self._rows.decode(next_tokens, [(p.prefill, columns) for p, columns in pieces])
            self._join_prefilled([p for p, _ in pieces], folded=bool(next_tokens))
        else:
            self._rows.decode(next_tokens)
        self.stats.forward_passes += 1
        if runs_ahead:
            _stream_text(pushed)

    def _pieces(self) -> list[tuple[_Prefilling, int]]:
        """The prefills under way that the next pass runs, and how many
        columns of each (:func:`plan_pass`), in the queue's order."""
        prefills = [p.prefill for p in self._prefilling]
        columns = plan_pass(prefills, self.prefill_chunk, self.long_prompt_tokens)
        return [(p, c) for p, c in zip(self._prefilling, columns, strict=True) if c]

    def _join_prefilled(self, ran: list[_Prefilling], folded: bool) -> None:
        """After a pass: the prefills of ``ran`` that had their last piece
        join the rows where the rows put them, in the order they took them."""
        finished = []
        for prefilling in ran:
            prefilling.pieces += 1
            lengths = prefilling.prefill.lengths
            if lengths is not None:
                finished.append(prefilling)
                self._joined(prefilling.sequences, lengths, prefilling.prefill.row)
                self.stats.folded_prefills += folded
                self.stats.split_prefills += prefilling.pieces > 1
        # Replaced, not changed in place, and after they joined: see batch_load.
        self._prefilling = [p for p in self._prefilling if p not in finished]

    def _drop_cancelled_prefills(self) -> None:
        """Stop prefilling for sequences whose callers are all gone; one
        cancelled among others is dropped once it is a row."""
        gone = [p for p in self._prefilling if all(s.future.done() for s in p.sequences)]
        if gone:
            self._prefilling = [p for p in self._prefilling if p not in gone]
            for prefilling in gone:
                self.stats.cancelled += sum(s.future.cancelled() for s in prefilling.sequences)

    def _sample_rows(self) -> tuple[list[int], list[int], list[_Sequence]]:
        """Each row's next token, and the rows that go on: their indices,
        their tokens, and those whose new text is left to stream. A row that
        ended (its end token, its limit, its caller gone, its own failure)
        is settled here and left out; what the rows held for one that
        finished is kept for prompts that start the same way."""
        logits = self._rows.logits
        self._masks.wait()
        keep, next_tokens = [], []
        pushed: list[_Sequence] = []  # kept rows whose new token's text is not decoded yet
        finished: list[tuple[int, list[int]]] = []  # rows, and the tokens they were fed
        # Greedy rows take their argmax from one batched call: one transfer
        # from the device per step rather than one per row.
        greedy = logits.argmax(-1).tolist()
        for row, sequence in enumerate(self._sequences):
            if sequence.future.done():  # cancelled, or failed streaming its text
                self.stats.cancelled += sequence.future.cancelled()
                continue
            try:
                token, ended = self._next_token(sequence, logits[row], greedy[row])
                if ended or len(sequence.text.tokens) >= sequence.request.sampling.max_new_tokens:
                    self._finish(sequence, "stop" if ended else "length")
                    finished.append((row, sequence.prompt_ids + sequence.text.tokens))
                    continue
            except Exception as err:  # this row's own (its controls, its stream): it alone ends
                _settle(sequence.future, exception=err)
                continue
            keep.append(row)
            next_tokens.append(token)
            if not sequence.text.stop:
                pushed.append(sequence)
        if finished:
            self._rows.remember(finished)
        return keep, next_tokens, pushed

    def _next_token(
        self, sequence: _Sequence, logits: torch.Tensor, greedy: int
    ) -> tuple[int, bool]:
        """Pick ``sequence``'s next token from its row of ``logits`` (its
        ``greedy`` token comes from the batch's argmax) and record it; True
        where the sequence has ended on it."""
        sampler, sampling = sequence.sampler, sequence.request.sampling
        token = greedy if sampler.greedy and not sampler.changes_logits else sampler.pick(logits)
        if sequence.first_token_at is None:
            sequence.first_token_at = time.monotonic()
        if token in sampling.stop_token_ids or (
            token in self.eos_token_ids and not sampling.ignore_eos
        ):
            return token, True
        sampler.record(token)
        if sampling.logprobs is not None:
            sequence.add_logprob(self._token_logprob(sampler, logits, token))
        self.stats.generated_tokens += 1
        ended = False
        if sequence.text.stop:  # its text may end the sequence: decoded now
            sequence.emit(sequence.text.append(token))
            ended = sequence.text.stopped
        else:  # decoded once every row is sampled (_stream_text)
            sequence.text.push(token)
        if sampler.constraint is not None:
            sampler.constraint.advance(token)
            ended = ended or sampler.constraint.complete
        return token, ended

    def _admit_apart(self, arrivals: list[_Sequence]) -> None:
        """Prefill ``arrivals`` in passes of their own. Should that fail (a GPU
        out of memory on a long prompt), only they fail: the rows promise to
        leave the running ones as they were, so those decode on. Meanwhile
        they count as rows (:meth:`batch_load`), as they have since they were
        taken: a long prompt's passes take a while, and a replica busy with
        them is not idle."""
        try:
            self._admit(arrivals)
        except Exception as err:
            if isinstance(err, torch.OutOfMemoryError):
                # What the failed pass took stays in torch's cache otherwise,
                # out of reach of another replica sharing this GPU.
                torch.cuda.empty_cache()
            for sequence in arrivals:
                _settle(sequence.future, exception=err)
        finally:
            self._admitting = []  # after _joined, where they joined: see batch_load

    def _admit(self, sequences: list[_Sequence]) -> None:
        """Prefill ``sequences`` together (in one pass, or a few where the
        rows cut a large admission); they join the batch's rows."""
        prompts, positions = [s.prompt_ids for s in sequences], list(map(_positions, sequences))
        self._joined(sequences, self._rows.admit(prompts, positions))
        self.stats.forward_passes += self._rows.prefill_passes
        for sequence, cached in zip(sequences, self._rows.cached_tokens, strict=True):
            sequence.cached_tokens = cached
            self.stats.reused_prompt_tokens += cached

    def _joined(
        self, sequences: list[_Sequence], lengths: list[int], at: int | None = None
    ) -> None:
        """Record ``sequences`` as the batch's rows from index ``at`` on (by
        default after the others), prefilled to ``lengths``."""
        for sequence, length in zip(sequences, lengths, strict=True):
            sequence.prompt_tokens = length
        rows = self._sequences
        at = len(rows) if at is None else at
        self._sequences = rows[:at] + sequences + rows[at:]  # replaced: see batch_load
        self.stats.prefills += 1
        self.stats.shared_prefills += len(sequences) - len({tuple(s.prompt_ids) for s in sequences})
        self.stats.sequences += len(sequences)

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        sequence.emit(sequence.text.finish())
        start, first = sequence.submitted_at, sequence.first_token_at or time.monotonic()
        completion = Completion(
            text=sequence.text.text,
            prompt_tokens=sequence.prompt_tokens,
            completion_tokens=len(sequence.text.tokens),
            finish_reason=reason,
            logprobs=None
            if sequence.request.sampling.logprobs is None
            else tuple(sequence.logprobs),
            timing=Timing(first_token_s=first - start, total_s=time.monotonic() - start),
            cached_tokens=sequence.cached_tokens,
        )
        _settle(sequence.future, result=completion)

    def _token_logprob(self, sampler: Sampler, logits: torch.Tensor, token: int) -> TokenLogprob:
        value, top = sampler.logprobs(logits, token)
        text = self.tokenizer.decode
        return TokenLogprob(text([token]), value, tuple((text([t]), v) for t, v in top))


def _stream_text(sequences: list[_Sequence]) -> None:
    """Decode and stream each sequence's tokens pushed this step.

    Why it waits: decoding is two tokenizer calls a streamed row, which for
    a full batch rivals a small model's GPU step (bench/RESULTS.md, "The GPU
    layout's host work"). Where the decode step
    runs ahead (a captured graph, queued on the GPU), this runs after it is
    queued, while the GPU computes; where the step runs before returning (on
    CPU, eagerly, or while a graph is first captured), before it, so no
    stream gets its text a step late."""
    for sequence in sequences:
        try:
            sequence.emit(sequence.text.flush())
        except Exception as err:  # its stream's reader failed: the next step drops it
            _settle(sequence.future, exception=err)


def _positions(sequence: _Sequence) -> int:
    """The most positions a sequence reaches in the cache: its prompt and new tokens."""
    return len(sequence.prompt_ids) + sequence.request.sampling.max_new_tokens


def _settle(
    future: Future[Any],
    result: Any = None,
    exception: BaseException | None = None,
) -> None:
    """Resolve a future unless its caller cancelled it (which may race with us)."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
