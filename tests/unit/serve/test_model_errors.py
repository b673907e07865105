"""What a replica's failure becomes in the ingress (helpers/serve/model_errors.py),
for errors as they arrive there: pickled by Ray in the replica, unpickled in
the ingress and raised as an instance of their cause's class too."""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import (
    NodeDiedError,
    OutOfMemoryError,
    OwnerDiedError,
    RayTaskError,
    WorkerCrashedError,
)

from helpers.api.errors import ApiError
from helpers.protocol import BatcherClosedError, FieldError, TokenIdError
from helpers.serve.model_errors import RETRY_AFTER_S, RequestFields, model_error

GENERATE = RequestFields("prompt", controls="generation_kwargs.")


def from_replica(error: Exception) -> Exception:
    """``error`` raised in a replica's call, as the ingress catches it."""
    wrapped = RayTaskError("stream", "Traceback (most recent call last): ...", error, "p", 1, "ip")
    return pickle.loads(pickle.dumps(wrapped)).as_instanceof_cause()


def assert_retry_later(mapped: ApiError | None) -> None:
    assert mapped is not None and mapped.status == 503
    assert (mapped.headers or {}).get("Retry-After") == str(RETRY_AFTER_S)
    assert "Traceback" not in mapped.message


def test_a_replica_whose_decode_loop_stopped_answers_503_to_retry() -> None:
    """Serve's health check replaces such a replica within seconds."""
    assert_retry_later(model_error(from_replica(BatcherClosedError()), GENERATE, 30))


@pytest.mark.parametrize(
    "error",
    [
        OutOfMemoryError("killed by the memory monitor"),
        WorkerCrashedError(),
        NodeDiedError("node gone"),
        OwnerDiedError("ab12", None, ""),
    ],
    ids=["out of memory", "worker crashed", "node died", "owner died"],
)
def test_a_replica_process_that_died_answers_503_to_retry(error: Exception) -> None:
    assert_retry_later(model_error(error, GENERATE, 30))


@pytest.mark.parametrize(
    ("error", "field"),
    [
        (FieldError("prompt", "prompt: it has no tokens"), "prompt"),
        (FieldError("messages", "messages: the chat template refused them"), "messages"),
        (TokenIdError("logit_bias", "logit_bias: token id 9 is outside"), "logit_bias"),
    ],
    ids=["prompt", "messages", "a sampling control"],
)
def test_only_a_sampling_control_is_named_under_the_controls_prefix(
    error: FieldError, field: str
) -> None:
    mapped = model_error(from_replica(error), GENERATE, 30)
    assert mapped is not None and mapped.status == 400
    prefix = "generation_kwargs." if field == "logit_bias" else ""
    assert (mapped.param, mapped.message) == (prefix + field, prefix + error.message)
