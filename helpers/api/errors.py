"""Error bodies: one JSON shape for every refusal the server makes.

The shape is OpenAI's error object, ``{"error": {"message", "type", "param",
"code"}}``, so plain HTTP clients and the openai client read the same thing.
``param`` names the offending field. Bodies never echo the input (which may
be megabytes) nor carry a stack trace.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raised by endpoint code to refuse a request with a given status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


REQUEST_ID_HEADER = "x-request-id"
"""Serve's proxy keeps a client's id here, or makes one, and returns it in
the response's headers; error bodies repeat it."""


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What an id a client chose may be to be repeated in an error body: the
characters of UUIDs and tracing ids, and short. Anything else the client
can still find by the response's header, which Serve keeps."""


def request_id(request: Request) -> str | None:
    given = request.headers.get(REQUEST_ID_HEADER)
    return given if given and REQUEST_ID.fullmatch(given) else None


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_status(error: Any) -> int:
    """The HTTP status an error object stands for, read back from its
    ``type``: a stream's error event carries no status of its own, since the
    response had begun with 200 (a timeout is 408, a lost replica 503)."""
    kind = error.get("type") if isinstance(error, dict) else None
    return next((status for status, name in _TYPES.items() if name == kind), 500)


def error_body(
    status: int, message: str, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, with the request's id where known (a client
    quoting it finds the replica's log lines about that request)."""
    error = {"message": message, "type": error_type(status), "param": param, "code": None}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_response(
    request: Request,
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, param, request_id(request))
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error_to_api_error(
    err: ValidationError, default_param: str, body: Any = None
) -> ApiError:
    """Report the first problem pydantic found, naming its field by dotted path."""
    return _first_problem(err.errors(include_input=False, include_url=False), default_param, body)


def _first_problem(
    problems: Sequence[Mapping[str, Any]], default_param: str, body: Any = None
) -> ApiError:
    """The first of pydantic's (or FastAPI's) problems as a 400 naming its field;
    with the client's ``body``, by the path the client sent."""
    first = problems[0]
    path = _input_path(first["loc"], body) if body is not None else first["loc"]
    param = shorten(".".join(str(part) for part in path) or default_param)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not an accepted field"
    return ApiError(400, f"{param}: {message}", param)


def _input_path(loc: tuple[int | str, ...], body: Any) -> list[int | str]:
    """The part of pydantic's error location that is a path in the client's JSON.

    For a field that accepts one of several types (``prompt``: a string or a
    list), pydantic inserts the name of the type it tried (``prompt.
    constrained-str``); a client knows only the path it sent.
    """
    path: list[int | str] = []
    node = body
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)
            if part not in node:  # a missing field: nothing below it to follow
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int):
            path.append(part)
            node = node[part] if part < len(node) else None
        # anything else names a type pydantic tried, not a place in the body
    return path


def shorten(text: str, limit: int = 80) -> str:
    """Cap a client-chosen name (an unknown key can be megabytes long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _on_api_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, ApiError)
    return error_response(request, err.status, err.message, err.param, err.headers)


async def _on_http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    return error_response(request, err.status_code, str(err.detail), headers=err.headers)


async def _on_request_validation(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    refusal = _first_problem(err.errors(), default_param="body")
    return error_response(request, refusal.status, refusal.message, refusal.param)


async def _on_unexpected(request: Request, err: Exception) -> JSONResponse:
    # The traceback goes to the replica's log (Serve logs it); the client
    # learns only that the fault was ours.
    message = "internal error: the server could not complete the request"
    return error_response(request, 500, message)


EXCEPTION_HANDLERS = {
    Exception: _on_unexpected,
    ApiError: _on_api_error,
    StarletteHTTPException: _on_http_error,
    RequestValidationError: _on_request_validation,
}
