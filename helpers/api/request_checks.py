"""What the ingress checks before it reads a request's fields: the API key,
the content type and the body's size, then that the body is JSON at all,
and text: JSON may escape half of a UTF-16 pair (``"\\ud800"``), which no
tokenizer or grammar compiler can read.

The key is checked first, so an unauthenticated client cannot make the server
read or parse a large body. The body is read in chunks and refused as soon as
it passes ``MAX_BODY_BYTES``, whatever its ``Content-Length`` claims. A client
that hangs up before its body is whole is refused too (499), so that neither
the logs nor the metrics count its departure as the server's fault.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from helpers.api.errors import ApiError, shorten

BEARER = "bearer"
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""Where a body may hold a lone surrogate: only these escapes make one."""
TEXT_OR_NESTED = (str, dict, list)
"""What the search for one walks into: not numbers (a prompt's token ids)."""
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left before its answer, and the one
Serve's proxy records when it cancels a request whose client disconnected.
No one reads the answer; the status says the client left, not the server
failed, and the metrics count it as cancelled."""


def check_api_key(request: Request, api_key: str) -> None:
    """Refuse with 401 unless ``Authorization: Bearer <api_key>`` (no key set: allow)."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the first differing byte, so the
    # time of a refusal does not tell an attacker how much of a guess was right.
    if scheme.lower() != BEARER or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <API_KEY>'",
            "Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def read_json(request: Request, max_bytes: int, timeout_s: float) -> Any:
    """The body parsed as JSON, or a 4xx that says what is wrong with it.

    ``timeout_s`` bounds the upload: a client trickling its body would
    otherwise hold a place in the ingress for as long as it liked."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise ApiError(
            415,
            "the body must be JSON: send the header 'Content-Type: application/json'",
            "Content-Type",
        )
    too_large = ApiError(413, f"the body is larger than {max_bytes} bytes (MAX_BODY_BYTES)", None)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > max_bytes:
                    raise too_large
    except ClientDisconnect:
        message = "the client closed the connection before it sent the whole request body"
        raise ApiError(CLIENT_CLOSED_REQUEST, message, None) from None
    except TimeoutError:
        message = f"the request body did not arrive within {timeout_s:g} s (REQUEST_TIMEOUT_S)"
        raise ApiError(408, message, None) from None
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", None)
    try:
        # Decoded strictly here: json.loads would let a surrogate's own bytes through.
        text = raw.decode(json.detect_encoding(raw))
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", None) from None
    except ValueError:  # Python refuses to read an integer of over 4,300 digits
        raise ApiError(400, "the request body holds a number too long to read", None) from None
    except RecursionError:  # deeply nested arrays
        raise ApiError(400, "the request body is nested too deeply", None) from None
    if SURROGATE_ESCAPE.search(text) and (path := _lone_surrogate(body)) is not None:
        param = shorten(path) or None
        raise ApiError(400, f"{param or 'the body'}: holds half of a UTF-16 pair, not text", param)
    return body


def _lone_surrogate(body: Any) -> str | None:
    """The dotted path to a string, or to the object with a key, that is not
    text; None when every one is. A loop, not recursion: the body may be
    nested as deeply as the JSON reader allows."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str) and not _encodes(node):
            return path
        if isinstance(node, dict):
            for key, value in node.items():
                if not _encodes(key):
                    return path
                if isinstance(value, TEXT_OR_NESTED):
                    stack.append((f"{path}.{key}" if path else key, value))
        elif isinstance(node, list):
            stack.extend(
                (f"{path}.{index}" if path else str(index), value)
                for index, value in enumerate(node)
                if isinstance(value, TEXT_OR_NESTED)  # not a path per token id
            )
    return None


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
