"""Request and response bodies of ``POST /generate``, as pydantic models.

Shapes follow the walkthrough exactly. Every model forbids unknown keys: the
walkthrough's app forwarded ``generation_kwargs`` to ``model.generate()``
wholesale, and transformers accepts keys there (``trust_remote_code``,
``custom_generate``) that load and run code. Only the three allow-listed
sampling knobs ever reach the engine.

Limits that depend on the deployment (``MAX_NEW_TOKENS``, ``MAX_PROMPTS``) come
in through pydantic's validation context, so these models stay static.
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
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

Prompt = Annotated[StrictStr, Field(min_length=1)]
# StrictFloat accepts ints (1 is a fine temperature) but refuses "0.5" and true.
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


def limit_from_context(
    value: int | None, info: ValidationInfo, key: str, variable: str, unit: str = ""
) -> int | None:
    """Refuse ``value`` above the deployment's limit ``info.context[key]``."""
    limit = (info.context or {}).get(key)
    if value is not None and limit is not None and value > limit:
        raise ValueError(f"must be at most {limit}{unit} ({variable})")
    return value


class GenerationKwargs(BaseModel):
    """The sampling knobs a client may set; anything else is refused."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _within_server_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return limit_from_context(value, info, "max_new_tokens", "MAX_NEW_TOKENS")


class GenerateRequest(BaseModel):
    """``prompt`` (one string) or ``prompts`` (a list), never both.

    ``stream`` is this kit's addition: ``true`` answers with server-sent
    events instead of the walkthrough's JSON body.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    prompts: Annotated[list[Prompt], Field(min_length=1)] | None = None
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    stream: StrictBool = False

    @field_validator("prompts")
    @classmethod
    def _within_prompt_limit(cls, value: list[str] | None, info: ValidationInfo) -> Any:
        if value is not None:
            limit_from_context(len(value), info, "max_prompts", "MAX_PROMPTS", unit=" prompts")
        return value

    @model_validator(mode="after")
    def _exactly_one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list)")
        return self

    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class UsedGenerationKwargs(BaseModel):
    """The values actually used, defaults filled in, echoed in the response."""

    max_new_tokens: int
    temperature: float
    top_p: float


class GenerateResponse(BaseModel):
    model: str
    prompts: list[str]
    completions: list[str]
    generation_kwargs: UsedGenerationKwargs
