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
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from helpers.api.errors import ApiError
from helpers.protocol import Prompt, Sampling, TextDelta
from helpers.serve.model_errors import RequestFields, model_error

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "LLMServer"
GAVE_UP = {"DEPLOY_FAILED", "REPLICA_STARTUP_FAILED"}
"""Statuses and triggers that mean Serve stopped trying to start replicas. An
UNHEALTHY deployment whose replica failed a health check or lost its node is
still starting a replacement, so a request waits for that one."""
START_CHECK_INTERVAL_S = 2.0
"""While a request waits for a replica, how often to ask whether Serve gave up
starting one (a model that cannot load), so the request fails instead of
waiting out REQUEST_TIMEOUT_S."""
STATUS_TTL_S = 1.0
"""How long one read of the model deployment's status serves every asker."""


def model_deployment_status() -> Any:
    """The model deployment's entry in ``serve.status()``, or None."""
    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    return application.deployments.get(MODEL_DEPLOYMENT) if application else None


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
        self, read: Callable[[], Any] = model_deployment_status, ttl_s: float = STATUS_TTL_S
    ) -> None:
        self._read_status = read
        self.ttl_s = ttl_s
        self._read: asyncio.Future[Any] | None = None
        self._read_at = float("-inf")

    async def deployment(self) -> Any:
        """The latest read, or a new one once it is ``ttl_s`` old; askers
        who come while a read runs wait for that read."""
        now = asyncio.get_running_loop().time()
        read = self._read
        # A read that failed is not kept: the next asker tries again.
        if read is None or (read.done() and (_failed(read) or now - self._read_at >= self.ttl_s)):
            self._read_at = now
            self._read = asyncio.ensure_future(asyncio.to_thread(self._read_status))
        # One asker giving up (its client left) must not cancel everyone's read.
        return await asyncio.shield(self._read)

    async def replica_states(self) -> dict[str, int]:
        """Model replicas by lower-case state, always with a ``running`` count."""
        return _replica_states(await self.deployment())

    def replica_answered(self) -> None:
        """A replica took a request: a read that counted none running is out
        of date, so the next asker reads again. A notebook asks right after
        its cold request, and must see the replica that answered it."""
        read = self._read
        counted_none = (
            read is not None
            and read.done()
            and not _failed(read)
            and not _replica_states(read.result())["running"]
        )
        if counted_none:
            self._read = None

    async def start_failure(self) -> str | None:
        """Why the model deployment cannot start replicas, if Serve gave up on
        it. None too when the controller did not answer: a request waiting
        for a replica then waits on, and asks again."""
        try:
            deployment = await self.deployment()
        except Exception:
            logger.warning("could not read the model deployment's status", exc_info=True)
            return None
        return None if deployment is None else _gave_up(deployment)


def _replica_states(deployment: Any) -> dict[str, int]:
    states = deployment.replica_states if deployment else {}
    return {"running": 0, **{state_name(s).lower(): n for s, n in states.items()}}


def _failed(read: asyncio.Future[Any]) -> bool:
    return read.cancelled() or read.exception() is not None


def _gave_up(deployment: Any) -> str | None:
    """Serve's reason, when the deployment's status says it stopped trying."""
    if not {state_name(deployment.status), state_name(deployment.status_trigger)} & GAVE_UP:
        return None
    lines = [line for line in deployment.message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else state_name(deployment.status)


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
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self._deltas.__anext__(), remaining)
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
        first.cancel()


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
        if not pending.done() and (failure := await status.start_failure()):
            raise ApiError(503, f"the model deployment failed to start: {failure}")
    result = pending.result()
    status.replica_answered()
    return result


async def open_stream(
    llm: DeploymentHandle,
    prompts: list[Prompt],
    sampling: Sampling,
    *,
    text: bool,
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
        prompts, sampling, text
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
        pending.cancel()


async def _awaited(call: DeploymentResponse) -> Any:
    return await call
