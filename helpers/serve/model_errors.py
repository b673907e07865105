"""How a failed call to the model deployment becomes an HTTP answer.

Ray re-raises a replica's exception in the ingress wrapped with its remote
traceback, and Serve raises its own errors for a full queue or a replica that
died; none of that belongs in a response. Each known failure maps to a status
a client can act on: fix the request (400), retry later (503 with
``Retry-After``), or give up waiting (408).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.exceptions import (
    NodeDiedError,
    OutOfMemoryError,
    OwnerDiedError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from helpers.api.errors import ApiError
from helpers.api.sampling_controls import SamplingControls
from helpers.protocol import BatcherClosedError, FieldError, PromptTooLongError

RETRY_AFTER_S = 2
"""Suggested wait before retrying a 503: about one decode of a short reply here."""

REPLICA_DIED = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, OwnerDiedError)
"""The ways Ray says a replica's process went away mid-call: it crashed, the
memory monitor killed it, its node died. None of the others is a
RayActorError. Serve starts another replica, so a retry can succeed."""


def retry_later(message: str) -> ApiError:
    return ApiError(503, message, None, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass(frozen=True)
class RequestFields:
    """Where an endpoint's prompt and sampling controls sit in its body, so
    that a refusal only a replica can make names the field as sent."""

    prompt: str
    controls: str = ""
    """The sampling controls' prefix: ``generation_kwargs.`` for ``/generate``."""


def model_error(err: BaseException, fields: RequestFields, timeout_s: float) -> ApiError | None:
    """The answer for a known failure of a model call, or None for an unknown one."""
    if isinstance(err, PromptTooLongError):
        return ApiError(400, f"{fields.prompt}: {getattr(err, 'cause', err)}", fields.prompt)
    if isinstance(err, FieldError):
        cause = getattr(err, "cause", err)
        # Only a sampling control sits under the prefix: the replica refuses
        # ``prompt`` and ``messages`` too, which sit at the top of the body.
        prefix = fields.controls if cause.field in SamplingControls.model_fields else ""
        return ApiError(400, prefix + cause.message, prefix + cause.field)
    if isinstance(err, TimeoutError):
        return ApiError(408, f"the request took longer than REQUEST_TIMEOUT_S ({timeout_s:g} s)")
    if isinstance(err, BackPressureError):
        return retry_later(
            "the model is at capacity (MAX_ONGOING_REQUESTS per replica and "
            "MAX_QUEUED_REQUESTS waiting): retry shortly"
        )
    if isinstance(err, DeploymentUnavailableError):
        return ApiError(
            503,
            "the model deployment failed to start; `serve status` shows why "
            "(often a MODEL_ID that cannot be loaded)",
            None,
        )
    if isinstance(err, BatcherClosedError):
        return retry_later("the model replica can no longer decode and is being replaced: retry")
    if isinstance(err, REPLICA_DIED):
        return retry_later("the model replica stopped while working on this request: retry")
    return None
