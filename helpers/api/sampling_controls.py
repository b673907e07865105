"""The sampling controls both APIs take, beyond temperature and top-p.

vLLM's and OpenAI's names and ranges, so clients written for either work
unchanged: ``top_k``, ``min_p``, the three penalties, ``logit_bias``, and
vLLM's ``stop_token_ids`` and ``ignore_eos``, which benchmarks use. One
model holds them for ``/generate``'s ``generation_kwargs`` and for both
OpenAI endpoints. Token ids are checked against the vocabulary by the model
replica, the only place that knows it (``Engine.check_token_ids``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

from helpers.api.fields import MAX_TOKEN_ID, TokenId, items

MAX_LOGIT_BIAS = 300
"""Most entries in ``logit_bias``, OpenAI's limit."""
MAX_STOP_TOKEN_IDS = 64

Penalty = Annotated[StrictFloat, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[StrictFloat, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class SamplingControls(BaseModel):
    """Each control left out (or null) is off."""

    model_config = ConfigDict(extra="forbid")

    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: (
        Annotated[StrictFloat, Field(gt=0.0, le=2.0, allow_inf_nan=False)] | None
    ) = None
    logit_bias: Annotated[dict[str, Bias], items(max_length=MAX_LOGIT_BIAS)] | None = None
    stop_token_ids: Annotated[list[TokenId], items(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: StrictBool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (
                key.isascii() and key.isdigit() and len(key) <= 20 and int(key) <= MAX_TOKEN_ID
            ):
                raise ValueError(
                    f"keys must be token ids (integers from 0 to {MAX_TOKEN_ID}), not {key[:20]!r}"
                )
        return value

    def controls(self) -> dict[str, Any]:
        """The controls that were set, as :class:`~helpers.protocol.Sampling`'s fields."""
        chosen = {name: value for name, value in self if name in SamplingControls.model_fields}
        fields: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
        if "top_k" in fields:
            fields["top_k"] = max(fields["top_k"], 0)
        if "logit_bias" in fields:
            fields["logit_bias"] = tuple(
                (int(k), float(v)) for k, v in fields["logit_bias"].items()
            )
        if "stop_token_ids" in fields:
            fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
        for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if name in fields:
                fields[name] = float(fields[name])
        return fields
