"""Calls from the ingress to the model deployment: how they wait, end and fail.

Every completion goes through ``LLMServer.stream``, whole replies too (its
docstring says why); ``/tokenize`` and ``/detokenize`` are plain calls
(:func:`call_model`) that wait, end and fail the same way. The ingress waits
for the stream's first, empty item, the sign that a replica accepted the
prompts: a cold start happens in that wait,
and a refusal (a prompt too long, a full queue, a deployment that cannot
start) is still a proper HTTP status. ``REQUEST_TIMEOUT_S`` bounds the whole
call, and however a call ends, it is cancelled, so the replica stops decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from helpers.api.errors import ApiError
from helpers.protocol import Prompt, Refused, Sampling, TextDelta
from helpers.serve import model_report
from helpers.serve.model_errors import RequestFields, model_error, retry_later

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "LLMServer"
START_CHECK_INTERVAL_S = 2.0
"""While a request waits for a replica, how often to ask whether Serve gave up
starting one (a model that cannot load), so the request fails instead of
waiting out REQUEST_TIMEOUT_S."""
START_FAILED = {"REPLICA_STARTUP_FAILED", "DEPLOYMENT_ACTOR_FAILED"}
"""The status triggers of failed starts, after which Serve may stop trying."""
STATUS_TTL_S = 1.0
"""How long one read of the model deployment's status serves every asker."""
STATUS_READ_TIMEOUT_S = 5.0
"""How long an asker waits for Serve's controller to answer a read. The read
itself goes on (a thread cannot be stopped), and askers after it wait for that
same read rather than start more."""


@dataclass(frozen=True)
class ModelView:
    """One read of what the ingress knows about the model deployment."""

    deployment: Any
    """Its entry in ``serve.status()``; None once the app is being deleted."""
    report: dict[str, Any] | None
    """The latest replica's report (:mod:`helpers.serve.model_report`)."""

    def replica_states(self) -> dict[str, int]:
        """Model replicas by lower-case state, always with a ``running`` count."""
        states = self.deployment.replica_states if self.deployment else {}
        return {"running": 0, **{state_name(s).lower(): n for s, n in states.items()}}


def read_model_view(app_name: str, report_key: str) -> ModelView:
    """The model deployment's status and report, as one blocking read."""
    application = serve.status().applications.get(app_name)
    deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
    return ModelView(deployment, model_report.read(report_key))


class ModelStatus:
    """The model deployment's status, read from the Serve controller at most
    once per ``ttl_s`` however many ask at once.

    Each read is a whole ``serve.status()``, a blocking call to the
    controller. In a cold start every waiting request asks whether Serve gave
    up, and ``/healthz`` probes ask for replica counts: without one shared
    read, a burst of requests would be a burst of controller calls, each
    holding a thread, just when the ingress is busiest.
    """

    def __init__(
        self,
        read: Callable[[], ModelView],
        ttl_s: float = STATUS_TTL_S,
        timeout_s: float = STATUS_READ_TIMEOUT_S,
    ) -> None:
        self._read_view = read
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self._read: asyncio.Future[ModelView] | None = None
        self._read_at = float("-inf")
        self._served = False

    async def view(self) -> ModelView:
        """The latest read, or a new one once it is ``ttl_s`` old; askers
        who come while a read runs wait for that read, ``timeout_s`` at most
        (then ``TimeoutError``)."""
        now = asyncio.get_running_loop().time()
        read = self._read
        # A read that failed is not kept: the next asker tries again.
        if read is None or (read.done() and (_failed(read) or now - self._read_at >= self.ttl_s)):
            self._read_at = now
            self._read = asyncio.ensure_future(asyncio.to_thread(self._read_view))
            self._read.add_done_callback(_log_failure)
        # One asker giving up (its client left) must not cancel everyone's read.
        async with asyncio.timeout(self.timeout_s):
            view = await asyncio.shield(self._read)
        if view.replica_states()["running"]:
            self._served = True
        return view

    def replica_answered(self) -> None:
        """A replica took a request: a read that counted none running is out
        of date, so the next asker reads again. A notebook asks right after
        its cold request, and must see the replica that answered it."""
        self._served = True
        read = self._read
        counted_none = (
            read is not None
            and read.done()
            and not _failed(read)
            and not read.result().replica_states()["running"]
        )
        if counted_none:
            self._read = None

    async def start_failure(self) -> ApiError | None:
        """The answer for a request waiting for a replica when none will come:
        Serve gave up starting them, or the app is being deleted (a client
        may retry that one, on the app deployed again). None too when the
        controller did not answer: the request then waits on, and asks again."""
        try:
            deployment = (await self.view()).deployment
        except Exception:  # the read's own failure is logged once, by _log_failure
            return None
        if deployment is None or state_name(deployment.status_trigger) == "DELETING":
            return retry_later("the app is being deleted")
        reason = _gave_up(deployment, self._served)
        return reason and ApiError(503, f"the model deployment failed to start: {reason}")


def _failed(read: asyncio.Future[Any]) -> bool:
    return read.cancelled() or read.exception() is not None


def _log_failure(read: asyncio.Future[Any]) -> None:
    """Once a read, however many were waiting for it."""
    if not read.cancelled() and (error := read.exception()):
        logger.warning("could not read the model deployment's status: %r", error)


def _gave_up(deployment: Any, served: bool) -> str | None:
    """Serve's reason, when its status says it stopped trying to start replicas.

    That is repeated failed starts (``REPLICA_STARTUP_FAILED``, or the
    deployment's own actors'), and then only while no replica of this version
    has run (``DeploymentState._terminally_failed`` in Ray 2.60): a
    deployment that served before keeps retrying under the same trigger,
    unless the deploy itself failed (``DEPLOY_FAILED``). A failed health check
    is never final: Serve replaces the replica, even while it deploys.
    """
    status, trigger = state_name(deployment.status), state_name(deployment.status_trigger)
    if trigger not in START_FAILED or (served and status != "DEPLOY_FAILED"):
        return None
    lines = [line for line in deployment.message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else status


def state_name(state: Any) -> str:
    """Serve's status enums, or plain strings on some paths, as plain strings."""
    return str(getattr(state, "value", state))


class ModelStream:
    """The replica's stream of deltas, passed on until it ends or the deadline
    passes.

    However it stops, the replica's call is cancelled, so the replica stops
    decoding these prompts: at its end, at the deadline, when the client goes
    away mid-read (Starlette cancels the read), and when it is dropped unread
    or half read (the client left before the response began, or while the
    body waited to send): a generator never started has no ``finally`` to
    run, so this is a class that cancels in ``__del__`` too.
    """

    def __init__(
        self,
        deltas: DeploymentResponseGenerator,
        deadline: float,
        fields: RequestFields,
        timeout_s: float,
    ) -> None:
        self._deltas, self._deadline = deltas, deadline
        self._fields, self._timeout_s = fields, timeout_s
        self._ended = False

    def __aiter__(self) -> ModelStream:
        return self

    async def __anext__(self) -> list[TextDelta]:
        if self._ended:
            raise StopAsyncIteration
        try:
            # Not wait_for, which in Python 3.11 can return a result it got
            # just as the client left, and so lose the cancellation.
            async with asyncio.timeout_at(self._deadline):
                return await self._deltas.__anext__()
        except StopAsyncIteration:
            self.close()
            raise
        except Exception as err:
            self.close()
            raise model_error(err, self._fields, self._timeout_s) or err from None
        except BaseException:  # cancelled: the client went away
            self.close()
            raise

    def close(self) -> None:
        """Cancel the replica's call, once."""
        if not self._ended:
            self._ended = True
            _cancel(self._deltas)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _cancel(call: DeploymentResponse | DeploymentResponseGenerator) -> None:
    """Cancel a model call, best effort: a call that already failed re-raises
    its error from ``cancel()``, and has nothing left to cancel anyway."""
    with contextlib.suppress(Exception):
        call.cancel()


async def _accepted(
    deltas: DeploymentResponseGenerator, deadline: float, status: ModelStatus
) -> None:
    """Wait for the stream's first (empty) item: a replica took the request."""
    first = asyncio.ensure_future(deltas.__anext__())
    try:
        await _result_while_starting(first, deadline, status)
    finally:
        _drop(first)


async def _result_while_starting(
    pending: asyncio.Future, deadline: float, status: ModelStatus
) -> Any:
    """``pending``'s result, waited for until ``deadline``.

    A cold start happens in this wait. If Serve gives up starting replicas
    meanwhile, fail with its reason rather than wait until the deadline.
    """
    loop = asyncio.get_running_loop()
    while not pending.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        await asyncio.wait({pending}, timeout=min(START_CHECK_INTERVAL_S, remaining))
        if pending.done():
            break
        # A slow controller must hold the request neither past its deadline
        # nor after a replica answered it.
        failure = asyncio.ensure_future(status.start_failure())
        try:
            await asyncio.wait(
                {pending, failure},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            _drop(failure)
        if not pending.done() and failure.done() and (refusal := failure.result()):
            raise refusal
    result = pending.result()
    status.replica_answered()
    if isinstance(result, Refused):
        raise result.error
    return result


async def open_stream(
    llm: DeploymentHandle,
    prompts: list[Prompt],
    sampling: Sampling,
    *,
    streamed: bool,
    fields: RequestFields,
    timeout_s: float,
    status: ModelStatus,
) -> ModelStream:
    """Call ``LLMServer.stream`` and return its deltas once a replica accepted.

    Failures become the ``ApiError`` that fits (see :mod:`helpers.serve.model_errors`);
    ``fields`` names where a too-long prompt or an unknown token id came in.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    deltas: DeploymentResponseGenerator = llm.options(stream=True).stream.remote(
        prompts, sampling, streamed
    )
    try:
        await _accepted(deltas, deadline, status)
    except asyncio.CancelledError:  # the client left before a replica took it
        _cancel(deltas)
        raise
    except Exception as err:
        _cancel(deltas)
        raise model_error(err, fields, timeout_s) or err from None
    return ModelStream(deltas, deadline, fields, timeout_s)


async def call_model(
    call: DeploymentResponse, fields: RequestFields, timeout_s: float, status: ModelStatus
) -> Any:
    """The result of a plain (not streamed) call to the model deployment,
    with a stream's deadline, cold-start watch and error answers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    pending = asyncio.ensure_future(_awaited(call))
    try:
        return await _result_while_starting(pending, deadline, status)
    except asyncio.CancelledError:  # the client left
        _cancel(call)
        raise
    except Exception as err:
        _cancel(call)
        raise model_error(err, fields, timeout_s) or err from None
    finally:
        _drop(pending)


def _drop(task: asyncio.Future[Any]) -> None:
    """Cancel a task whose outcome no one will read. A task whose model call
    was cancelled meanwhile ends with Serve's ``RequestCancelledError``
    rather than as cancelled, and asyncio would log that as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _awaited(call: DeploymentResponse) -> Any:
    return await call
