"""The HTTP ingress: validates requests, answers health probes, forwards work.

It runs one small replica that never scales to zero. That matters for
scale-to-zero: ``/healthz`` is answered here from Serve's own bookkeeping, so
a load balancer probing every second neither keeps the model replica awake
nor wakes it from zero. Only ``/generate`` and ``/v1/*completions`` reach the
model deployment: answered whole through ``LLMServer.generate``, or streamed
through ``LLMServer.stream``.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from helpers.api_schema import GenerateRequest, GenerateResponse, UsedGenerationKwargs
from helpers.config import ServeConfig
from helpers.engine import Completion, PromptTooLongError
from helpers.errors import EXCEPTION_HANDLERS, ApiError, validation_error_to_api_error
from helpers.llm_server import Prompt, Sampling, TextDelta
from helpers.openai_responses import OpenAIFormat, model_card
from helpers.openai_schema import ChatCompletionRequest, CompletionRequest
from helpers.streaming import SSE_HEADERS, GenerateStream, StreamFormat, sse_body

MODEL_DEPLOYMENT = "LLMServer"
REPLICA_COUNT_TTL_S = 1.0

Body = TypeVar("Body", bound=BaseModel)


def _read_replica_states() -> dict[str, int]:
    """Model replicas by lower-case state, always with a ``running`` count."""
    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
    states = deployment.replica_states if deployment else {}
    return {"running": 0, **{state_name(s).lower(): n for s, n in states.items()}}


def state_name(state: Any) -> str:
    """Serve's status enums, or plain strings on some paths, as plain strings."""
    return str(getattr(state, "value", state))


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", None)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", None) from None


async def _cancel_when_closed(
    deltas: DeploymentResponseGenerator,
) -> AsyncIterator[list[TextDelta]]:
    """Pass the replica's stream on; when the client goes away (Starlette then
    stops iterating), cancel it so the replica stops decoding those prompts."""
    try:
        async for batch in deltas:
            yield batch
    finally:
        deltas.cancel()


def _prompt_too_long(err: PromptTooLongError, param: str) -> ApiError:
    # Ray re-raises the replica's exception wrapped with its remote traceback;
    # only the original message belongs in the response.
    return ApiError(400, f"{param}: {getattr(err, 'cause', err)}", param)


app = FastAPI(
    title="Ray Serve LLM",
    description="Serverless LLM inference on Ray Serve, scaling to zero.",
    exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
)


@serve.ingress(app)
class Ingress:
    """Serve deployment class; options are applied in :mod:`helpers.serve_app`."""

    def __init__(self, llm: DeploymentHandle, config: ServeConfig) -> None:
        self.llm = llm
        self.config = config
        self.started = int(time.time())
        self._replicas: dict[str, int] = {}
        self._replicas_read_at = float("-inf")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness and the model replicas by state, without touching the model."""
        return {
            "status": "ok",
            "model": self.config.model_id,
            "model_replicas": await self._model_replica_states(),
            "min_replicas": self.config.min_replicas,
            "max_replicas": self.config.max_replicas,
        }

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(self, request: Request) -> Any:
        """The walkthrough's endpoint; ``"stream": true`` streams it as events."""
        parsed = await self._parse(request, GenerateRequest, default_param="prompt")
        asked = parsed.generation_kwargs
        used = UsedGenerationKwargs(
            max_new_tokens=asked.max_new_tokens or self.config.max_new_tokens,
            temperature=self.config.temperature if asked.temperature is None else asked.temperature,
            top_p=self.config.top_p if asked.top_p is None else asked.top_p,
        )
        texts = parsed.prompt_list()
        prompts = [Prompt(text=text) for text in texts]
        sampling = Sampling(**used.model_dump())
        if parsed.stream:
            return await self._stream(prompts, sampling, GenerateStream(), "prompt")
        completions = await self._complete(prompts, sampling, "prompt")
        return GenerateResponse(
            model=self.config.model_id,
            prompts=texts,
            completions=[c.text for c in completions],
            generation_kwargs=used,
        )

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.config.model_id, self.started)]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return model_card(model, self.started)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        """OpenAI's completions: the prompt is completed as raw text, no template."""
        parsed = await self._parse(request, CompletionRequest, default_param="prompt")
        prompts = [Prompt(text=text, raw=True) for text in parsed.prompt_list()]
        return await self._openai(parsed, parsed.max_tokens, prompts, chat=False, param="prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI's chat completions: the messages go through the chat template."""
        parsed = await self._parse(request, ChatCompletionRequest, default_param="messages")
        prompt = Prompt(messages=tuple(m.as_pair() for m in parsed.messages))
        return await self._openai(
            parsed, parsed.token_limit(), [prompt], chat=True, param="messages"
        )

    async def _openai(
        self,
        parsed: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        prompts: list[Prompt],
        *,
        chat: bool,
        param: str,
    ) -> Any:
        self._check_model(parsed.model)
        sampling = Sampling(
            max_new_tokens=max_tokens or self.config.max_new_tokens,
            temperature=self.config.temperature
            if parsed.temperature is None
            else parsed.temperature,
            top_p=self.config.top_p if parsed.top_p is None else parsed.top_p,
            seed=parsed.seed,
            stop=parsed.stop_strings(),
        )
        shape = OpenAIFormat(parsed.model, chat=chat, include_usage=parsed.include_usage())
        if parsed.stream:
            return await self._stream(prompts, sampling, shape, param)
        return shape.response(await self._complete(prompts, sampling, param))

    async def _parse(self, request: Request, model: type[Body], default_param: str) -> Body:
        limits = {
            "max_new_tokens": self.config.max_new_tokens,
            "max_prompts": self.config.max_prompts,
        }
        try:
            return model.model_validate(await _json_body(request), context=limits)
        except ValidationError as err:
            raise validation_error_to_api_error(err, default_param) from None

    def _check_model(self, model: str) -> None:
        if model != self.config.model_id:
            raise ApiError(
                404,
                f"model: {model[:80]!r} is not served here; this server serves "
                f"{self.config.model_id!r} (see GET /v1/models)",
                "model",
            )

    async def _complete(
        self, prompts: list[Prompt], sampling: Sampling, param: str
    ) -> list[Completion]:
        try:
            return await self.llm.generate.remote(prompts, sampling)
        except PromptTooLongError as err:
            raise _prompt_too_long(err, param) from None

    async def _stream(
        self, prompts: list[Prompt], sampling: Sampling, shape: StreamFormat, param: str
    ) -> StreamingResponse:
        """Start streaming once the model replica accepted the prompts.

        Waiting for the acceptance (a replica may first have to start) keeps a
        refusal such as a too-long prompt a proper 400 instead of an error
        event inside a 200 stream.
        """
        deltas: DeploymentResponseGenerator = self.llm.options(stream=True).stream.remote(
            prompts, sampling
        )
        try:
            await deltas.__anext__()
        except PromptTooLongError as err:
            raise _prompt_too_long(err, param) from None
        return StreamingResponse(
            sse_body(_cancel_when_closed(deltas), shape),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def _model_replica_states(self) -> dict[str, int]:
        """Replica counts by state, read from the Serve controller at most once a second."""
        now = time.monotonic()
        if now - self._replicas_read_at >= REPLICA_COUNT_TTL_S:
            self._replicas = await asyncio.to_thread(_read_replica_states)
            self._replicas_read_at = now
        return self._replicas
