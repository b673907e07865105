"""Request and response bodies of ``POST /generate``, as pydantic models.

Shapes follow the walkthrough exactly. Every model forbids unknown keys: the
walkthrough's app forwarded ``generation_kwargs`` to ``model.generate()``
wholesale, and transformers accepts keys there (``trust_remote_code``,
``custom_generate``) that load and run code. Only the allow-listed sampling
knobs ever reach the engine: the walkthrough's three and the controls of
:mod:`helpers.api.sampling_controls`.

Limits that depend on the deployment (``MAX_NEW_TOKENS``, ``MAX_PROMPTS``) are
checked by the field types both APIs share (:mod:`helpers.api.fields`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from helpers.api.fields import Prompt, PromptList, Temperature, TokenCount, TopP
from helpers.api.sampling_controls import SamplingControls


class GenerationKwargs(SamplingControls):
    """The sampling knobs a client may set; anything else is refused."""

    max_new_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None


class GenerateRequest(BaseModel):
    """``prompt`` (one string) or ``prompts`` (a list), never both.

    ``stream`` is this kit's addition: ``true`` answers with server-sent
    events instead of the walkthrough's JSON body.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    prompts: PromptList | None = None
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    stream: StrictBool = False

    @model_validator(mode="after")
    def _exactly_one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list)")
        return self

    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class UsedGenerationKwargs(SamplingControls):
    """The values actually used, defaults filled in, echoed in the response;
    of the other controls, those the request set."""

    max_new_tokens: int
    temperature: float
    top_p: float


class GenerateResponse(BaseModel):
    model: str
    prompts: list[str]
    completions: list[str]
    generation_kwargs: UsedGenerationKwargs
