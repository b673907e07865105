"""The app's OpenAPI document, complete enough for clients and fuzzers.

The endpoints read their bodies themselves (checks first, then pydantic with
the deployment's limits), so FastAPI cannot see the request models and would
document no body at all. Here each POST route names its model, every route
documents the error statuses it can answer with, and the models' JSON schemas
are added to the document's components.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error object, the body of every 4xx and 5xx this app sends."""

    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("The body or a field is invalid; `param` names the field."),
    401: _error("API_KEY is set and the request lacks the right Bearer key."),
    404: _error("No such route, or a model other than the one served."),
    405: _error("The route exists with another method."),
    408: _error("The request ran past REQUEST_TIMEOUT_S."),
    413: _error("The body is larger than MAX_BODY_BYTES."),
    415: _error("The body is not declared as JSON."),
    500: _error("A fault of the server; the details are in its log."),
    503: _error("The model is at capacity or unavailable; see Retry-After."),
}


STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The reply; with `stream: true`, server-sent events ending in "
        "`data: [DONE]`.",
        "content": {
            "text/event-stream": {
                # One server-sent event: a JSON document (or [DONE]) in `data`.
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    }
}
"""Extra ``responses`` of a route that can stream its answer."""


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` from a JSON body itself."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def with_request_models(
    app: FastAPI, models: Sequence[type[BaseModel]]
) -> Callable[[], dict[str, Any]]:
    """An ``app.openapi`` that adds ``models`` (and the models they use) to components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    return openapi
