"""How the ingress's calls to the model deployment wait, share status reads and
are cancelled, with stand-ins for Serve's handles: no Ray involved (the
integration tests drive the same code through a real cluster)."""

from __future__ import annotations

import asyncio
import gc
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from helpers.api.errors import ApiError
from helpers.protocol import PromptTooLongError, Refused, Sampling
from helpers.serve import model_calls
from helpers.serve.model_calls import ModelStatus, ModelView, call_model, open_stream
from helpers.serve.model_errors import RequestFields

FIELDS = RequestFields("prompt")
STARTING = SimpleNamespace(
    status="UPDATING", status_trigger="CONFIG_UPDATE_STARTED", message="", replica_states={}
)
GAVE_UP = SimpleNamespace(
    status="DEPLOY_FAILED",
    status_trigger="REPLICA_STARTUP_FAILED",
    message="The deployment failed to start 2 times.\nmodel not found: no-such/model\n",
    replica_states={"STARTING": 0},
)


GAVE_UP_REASON = "the model deployment failed to start: model not found: no-such/model"
RETRYING = SimpleNamespace(**{**vars(GAVE_UP), "status": "UNHEALTHY"})
"""Failed starts of a deployment at zero replicas: Serve's last word only if
no replica of it ever ran."""
RUNNING = SimpleNamespace(**{**vars(STARTING), "replica_states": {"RUNNING": 1}})


class Reads:
    """A status read that counts its calls and, while ``held``, blocks (on a
    thread, as serve.status() does) until released."""

    def __init__(self, status: Any = STARTING, held: bool = False) -> None:
        self.status = status
        self.calls = 0
        self.finished = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()

    def __call__(self) -> ModelView:
        self.calls += 1
        try:
            assert self.release.wait(10)
            return ModelView(self.status, None)
        finally:
            self.finished.set()


class NeverAccepted:
    """A model stream whose replica never yields its first item."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.cancelled = False

    def __aiter__(self) -> NeverAccepted:
        return self

    async def __anext__(self) -> Any:
        self.asked.set()
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


class NeverAnswered:
    """A plain model call that never returns."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.cancelled = False

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        self.asked.set()
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


class Accepted(NeverAccepted):
    """A model stream whose replica takes the request at once."""

    async def __anext__(self) -> Any:
        self.asked.set()
        return []


class AcceptedThenQuiet(NeverAccepted):
    """A model stream whose replica takes the request, then sends nothing more."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = False

    async def __anext__(self) -> Any:
        if not self.accepted:
            self.accepted = True
            return []
        return await super().__anext__()


def handle_streaming(deltas: NeverAccepted) -> Any:
    """``llm.options(stream=True).stream.remote(...)`` returning ``deltas``."""
    method = SimpleNamespace(remote=lambda *args: deltas)
    return SimpleNamespace(options=lambda **options: SimpleNamespace(stream=method))


def streaming(deltas: NeverAccepted, status: ModelStatus, timeout_s: float = 60) -> Any:
    llm = handle_streaming(deltas)
    sampling = Sampling(4, temperature=0.0, top_p=1.0)
    return open_stream(
        llm, [], sampling, streamed=True, fields=FIELDS, timeout_s=timeout_s, status=status
    )


# -- ModelStatus ---------------------------------------------------------------------------


async def running(status: ModelStatus) -> int:
    return (await status.view()).replica_states()["running"]


def test_askers_at_once_share_one_read_and_a_later_one_reads_again() -> None:
    reads = Reads(held=True)
    status = ModelStatus(reads, ttl_s=0)

    async def scenario() -> list[dict[str, int]]:
        askers = [asyncio.ensure_future(running(status)) for _ in range(20)]
        await asyncio.sleep(0.05)  # every asker is waiting on the one read
        reads.release.set()
        answers = await asyncio.gather(*askers)
        await status.view()  # that read is done, and ttl_s is 0
        return answers

    answers = asyncio.run(scenario())
    assert answers == [0] * 20
    assert reads.calls == 2


def test_a_read_is_kept_for_its_time_to_live() -> None:
    reads = Reads(SimpleNamespace(**{**vars(STARTING), "replica_states": {"RUNNING": 2}}))
    status = ModelStatus(reads, ttl_s=3600)

    async def scenario() -> list[int]:
        return [await running(status) for _ in range(3)]

    assert asyncio.run(scenario()) == [2] * 3
    assert reads.calls == 1


def test_an_asker_who_leaves_does_not_cancel_the_read_for_the_others() -> None:
    reads = Reads(held=True)
    status = ModelStatus(reads, ttl_s=3600)

    async def scenario() -> str | None:
        leaver = asyncio.ensure_future(status.start_failure())
        stayer = asyncio.ensure_future(status.start_failure())
        await asyncio.sleep(0.05)
        leaver.cancel()
        reads.release.set()
        return await stayer

    assert asyncio.run(scenario()) is None
    assert reads.calls == 1


class FailsOnce(Reads):
    """The controller does not answer the first read."""

    def __call__(self) -> ModelView:
        if self.calls == 0:
            self.calls += 1
            raise TimeoutError("the controller did not answer")
        return super().__call__()


def test_a_failed_read_is_not_kept_and_a_waiting_request_waits_on() -> None:
    reads = FailsOnce(GAVE_UP)
    status = ModelStatus(reads, ttl_s=3600)

    async def scenario() -> list[str | None]:
        return [await refusal(status), await refusal(status)]

    assert asyncio.run(scenario()) == [None, GAVE_UP_REASON]
    assert reads.calls == 2


async def refusal(status: ModelStatus) -> str | None:
    """The message of what a waiting request would be answered, if anything."""
    refused = await status.start_failure()
    return refused and refused.message


def test_a_deployment_serve_gave_up_on_gives_serves_last_reason() -> None:
    refused = asyncio.run(ModelStatus(Reads(GAVE_UP)).start_failure())
    assert refused is not None and refused.status == 503 and refused.message == GAVE_UP_REASON
    assert asyncio.run(ModelStatus(Reads(STARTING)).start_failure()) is None


def test_a_failed_health_check_is_never_final_even_while_deploying() -> None:
    """Serve replaces the replica, and the status goes back to healthy."""
    checked = SimpleNamespace(**{**vars(GAVE_UP), "status_trigger": "HEALTH_CHECK_FAILED"})
    assert asyncio.run(ModelStatus(Reads(checked)).start_failure()) is None


def test_failed_starts_are_final_only_for_a_deployment_that_never_served() -> None:
    """Serve stops retrying after failed starts only while no replica of the
    deployment has run; after that the same status means it is retrying."""
    assert asyncio.run(refusal(ModelStatus(Reads(RETRYING)))) == GAVE_UP_REASON
    answered = ModelStatus(Reads(RETRYING))
    answered.replica_answered()
    assert asyncio.run(refusal(answered)) is None
    reads = Reads(RUNNING)
    seen_running = ModelStatus(reads, ttl_s=0)

    async def scenario() -> str | None:
        await seen_running.view()
        reads.status = RETRYING
        return await refusal(seen_running)

    assert asyncio.run(scenario()) is None
    # A deployment that gave up for good is final however it ran before.
    answered_then_failed = ModelStatus(Reads(GAVE_UP))
    answered_then_failed.replica_answered()
    assert asyncio.run(refusal(answered_then_failed)) == GAVE_UP_REASON


@pytest.mark.parametrize(
    "deleting",
    [None, SimpleNamespace(**{**vars(STARTING), "status_trigger": "DELETING"})],
    ids=["gone", "deleting"],
)
def test_a_request_waiting_on_a_deleted_app_is_refused_and_may_retry(deleting: Any) -> None:
    refused = asyncio.run(ModelStatus(Reads(deleting)).start_failure())
    assert refused is not None and refused.message == "the app is being deleted"
    assert refused.status == 503 and refused.headers and "Retry-After" in refused.headers


def test_a_read_the_controller_does_not_answer_times_out_for_its_askers() -> None:
    reads = Reads(held=True)
    status = ModelStatus(reads, timeout_s=0.05)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await status.view()
        assert not reads.finished.is_set(), "the asker waited for the read to end"
        reads.release.set()

    asyncio.run(scenario())


# -- calls ---------------------------------------------------------------------------------


def test_a_stream_whose_client_leaves_before_a_replica_takes_it_is_cancelled() -> None:
    deltas = NeverAccepted()

    async def scenario() -> None:
        call = asyncio.ensure_future(streaming(deltas, ModelStatus(Reads())))
        await deltas.asked.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert deltas.cancelled


def test_a_plain_call_whose_client_leaves_is_cancelled() -> None:
    call = NeverAnswered()

    async def scenario() -> None:
        waiting = asyncio.ensure_future(call_model(call, FIELDS, 60, ModelStatus(Reads())))
        await call.asked.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert call.cancelled


def test_a_stream_waiting_for_a_model_serve_gave_up_on_gets_503_and_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_calls, "START_CHECK_INTERVAL_S", 0.01)
    deltas = NeverAccepted()
    with pytest.raises(ApiError, match="model not found: no-such/model") as refused:
        asyncio.run(streaming(deltas, ModelStatus(Reads(GAVE_UP))))
    assert refused.value.status == 503
    assert deltas.cancelled


def test_a_stream_no_replica_takes_before_the_deadline_gets_408_and_is_cancelled() -> None:
    deltas = NeverAccepted()
    with pytest.raises(ApiError) as refused:
        asyncio.run(streaming(deltas, ModelStatus(Reads()), timeout_s=0.05))
    assert refused.value.status == 408
    assert deltas.cancelled


def test_a_stream_waiting_on_a_controller_that_does_not_answer_ends_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_calls, "START_CHECK_INTERVAL_S", 0.01)
    reads = Reads(held=True)
    deltas = NeverAccepted()

    async def scenario() -> None:
        with pytest.raises(ApiError) as refused:
            await streaming(deltas, ModelStatus(reads, timeout_s=3600), timeout_s=0.1)
        assert refused.value.status == 408
        assert not reads.finished.is_set(), "the request waited for the controller"
        reads.release.set()  # before asyncio.run waits for the read's thread

    asyncio.run(scenario())
    assert deltas.cancelled


class AcceptedWhenTold(NeverAccepted):
    """A model stream whose replica takes the request once ``accept`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.accept = asyncio.Event()

    async def __anext__(self) -> Any:
        self.asked.set()
        await self.accept.wait()
        return []


def test_a_request_a_replica_takes_during_a_slow_status_read_goes_on_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_calls, "START_CHECK_INTERVAL_S", 0.01)
    reads = Reads(held=True)

    async def scenario() -> None:
        deltas = AcceptedWhenTold()
        call = asyncio.ensure_future(streaming(deltas, ModelStatus(reads, timeout_s=3600)))
        while not reads.calls:  # the request now waits on a status read
            await asyncio.sleep(0.01)
        deltas.accept.set()
        await call
        assert not reads.finished.is_set(), "the accepted request waited for the read"
        reads.release.set()

    asyncio.run(scenario())


def test_a_request_a_replica_took_makes_a_read_that_counted_none_stale() -> None:
    """At zero replicas a read counts none; once a replica has taken a
    request, /healthz must not say none for the rest of the read's life."""
    reads = iter([STARTING, RUNNING])
    status = ModelStatus(lambda: ModelView(next(reads), None), ttl_s=3600)

    async def scenario() -> list[int]:
        before = await running(status)
        await streaming(Accepted(), status)
        return [before, await running(status)]

    assert asyncio.run(scenario()) == [0, 1]


def test_a_stream_dropped_unread_is_cancelled() -> None:
    """The client left after a replica took the request but before the
    response began: nothing ever reads the stream."""
    deltas = Accepted()

    async def scenario() -> None:
        stream = await streaming(deltas, ModelStatus(Reads()))
        del stream
        gc.collect()

    asyncio.run(scenario())
    assert deltas.cancelled


def test_a_stream_whose_reader_is_cancelled_mid_read_is_cancelled() -> None:
    deltas = AcceptedThenQuiet()

    async def scenario() -> None:
        stream = await streaming(deltas, ModelStatus(Reads()))
        reading = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert deltas.cancelled

    asyncio.run(scenario())


def test_a_stream_that_goes_quiet_past_its_deadline_gets_408_and_is_cancelled() -> None:
    deltas = AcceptedThenQuiet()

    async def scenario() -> None:
        stream = await streaming(deltas, ModelStatus(Reads()), timeout_s=0.1)
        with pytest.raises(ApiError) as refused:
            await stream.__anext__()
        assert refused.value.status == 408

    asyncio.run(scenario())
    assert deltas.cancelled


class CancelledLikeServe(NeverAccepted):
    """A model stream whose pending read, once its call was cancelled, ends
    with an error rather than as cancelled, as Serve's handles do
    (``RequestCancelledError``)."""

    async def __anext__(self) -> Any:
        self.asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.cancelled:
                raise RuntimeError("request cancelled") from None
            raise


def test_a_refused_waiting_request_leaves_no_error_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio logs an exception no one read ("Task exception was never
    retrieved") when the task is collected; a refusal must not leave one."""
    monkeypatch.setattr(model_calls, "START_CHECK_INTERVAL_S", 0.01)
    unread: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unread.append(context))
        with pytest.raises(ApiError):
            await streaming(CancelledLikeServe(), ModelStatus(Reads(GAVE_UP)))
        for _ in range(3):  # let the dropped tasks end
            await asyncio.sleep(0)
        gc.collect()

    asyncio.run(scenario())
    assert not unread, unread


class RefusedFirst(NeverAccepted):
    """A model stream whose replica refuses the prompt instead of accepting it."""

    async def __anext__(self) -> Any:
        self.asked.set()
        return Refused(PromptTooLongError("prompt tokens plus max_tokens exceed the context"))


def test_a_prompt_the_replica_refuses_gets_a_400_naming_its_field() -> None:
    deltas = RefusedFirst()
    with pytest.raises(ApiError) as refused:
        asyncio.run(streaming(deltas, ModelStatus(Reads())))
    assert (refused.value.status, refused.value.param) == (400, "prompt")
    assert deltas.cancelled
