"""OpenAI's ``response_format``: output that parses as JSON, or as JSON that a
schema accepts, on both OpenAI endpoints.

The fields are OpenAI's, so the openai client's own structured-output helper
(``client.chat.completions.parse`` with a pydantic model) works unchanged. A
schema is compiled by a model replica, the only place that holds the
tokenizer it is compiled against; one it cannot compile comes back as a 400
naming ``response_format`` (:class:`~helpers.protocol.GrammarError`).

``strict`` is accepted and changes nothing: every schema is enforced token by
token, as vLLM does, because a small model left unconstrained rarely writes
valid JSON.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    model_validator,
)

from helpers.api.schema_limits import check_multiple_of
from helpers.protocol import Grammar

MAX_SCHEMA_BYTES = 16_384
"""Largest schema, as compact JSON. The grammar library bounds the work a
schema can cause; this bounds what a replica is sent and compiles."""
ANY_OBJECT = {"type": "object"}
"""``json_object``: any JSON object, as OpenAI's JSON mode promises."""


def _small_enough(schema: dict[str, Any]) -> dict[str, Any]:
    if len(compact(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"must be at most {MAX_SCHEMA_BYTES} bytes as compact JSON")
    check_multiple_of(schema)
    return schema


Schema = Annotated[dict[str, Any], AfterValidator(_small_enough)]
"""A JSON schema a client sends: a response format's, or a tool's parameters."""


class JsonSchema(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    schema_: Schema = Field(default_factory=dict, alias="schema")
    """An empty schema accepts any JSON value, as JSON Schema defines it."""
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object``, or ``json_schema`` with its schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only there')
        return self

    def grammar(self) -> Grammar | None:
        """What the engine holds the output to; None for free text."""
        if self.type == "json_object":
            return Grammar(compact(ANY_OBJECT))
        if self.json_schema is not None:
            return Grammar(compact(self.json_schema.schema_))
        return None


def compact(schema: dict[str, Any]) -> str:
    """JSON without spaces: what a size limit counts, and what a replica is sent."""
    return json.dumps(schema, separators=(",", ":"))
