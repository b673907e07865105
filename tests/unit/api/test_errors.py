"""Error bodies (helpers/api/errors.py): what a client's own request id may
put in them."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from helpers.api.errors import error_status, error_type, request_id


def asked_with(request_id_header: str | None) -> Request:
    headers = [] if request_id_header is None else [(b"x-request-id", request_id_header.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


@pytest.mark.parametrize(
    "given", ["6f1c2a34-5b6d-4e7f-8a9b-0c1d2e3f4a5b", "trace:00-abc.def_1", "x" * 128]
)
def test_a_plain_request_id_is_repeated(given: str) -> None:
    assert request_id(asked_with(given)) == given


@pytest.mark.parametrize("given", ["x" * 129, "a b", "<script>", "id\x7f", ""])
def test_a_long_or_odd_request_id_is_left_out_of_the_body(given: str) -> None:
    """Any bytes a header may hold would otherwise go back in every error."""
    assert request_id(asked_with(given)) is None
    assert request_id(asked_with(None)) is None


@pytest.mark.parametrize("status", [400, 401, 404, 408, 429, 500, 503])
def test_an_error_events_type_reads_back_as_its_status(status: int) -> None:
    assert error_status({"type": error_type(status)}) == status
    assert error_status({"type": "something new"}) == 500 == error_status(None)
