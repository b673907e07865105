"""The HTTP ingress: checks and validates requests, answers health probes,
forwards work, and turns every failure into a JSON answer.

It runs one small replica that never scales to zero. That matters for
scale-to-zero: ``/healthz`` is answered here from Serve's own bookkeeping, so
a load balancer probing every second neither keeps the model replica awake
nor wakes it from zero. Only ``/generate`` and ``/v1/*completions`` reach the
model deployment, through ``LLMServer.stream``: sent on piece by piece, or
gathered into one reply.
"""

import asyncio
import contextlib
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
from helpers.engine import Completion, Sampling
from helpers.errors import EXCEPTION_HANDLERS, ApiError, validation_error_to_api_error
from helpers.llm_server import Prompt, TextDelta
from helpers.model_errors import model_error
from helpers.openai_responses import OpenAIFormat, model_card
from helpers.openai_schema import ChatCompletionRequest, CompletionRequest
from helpers.openapi_docs import ERROR_RESPONSES, STREAMED, json_body, with_request_models
from helpers.request_checks import check_api_key, read_json
from helpers.streaming import SSE_HEADERS, GenerateStream, StreamFormat, sse_body

MODEL_DEPLOYMENT = "LLMServer"
REPLICA_COUNT_TTL_S = 1.0
FAILED_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}
START_CHECK_INTERVAL_S = 2.0
"""While a request waits for a replica, how often to ask whether Serve gave up
starting one (a model that cannot load), so the request fails instead of
waiting out REQUEST_TIMEOUT_S."""

Body = TypeVar("Body", bound=BaseModel)


def _model_deployment_status() -> Any:
    """The model deployment's entry in ``serve.status()``, or None."""
    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    return application.deployments.get(MODEL_DEPLOYMENT) if application else None


def _read_replica_states() -> dict[str, int]:
    """Model replicas by lower-case state, always with a ``running`` count."""
    deployment = _model_deployment_status()
    states = deployment.replica_states if deployment else {}
    return {"running": 0, **{state_name(s).lower(): n for s, n in states.items()}}


def _model_start_failure() -> str | None:
    """Why the model deployment cannot start replicas, if Serve gave up on it."""
    deployment = _model_deployment_status()
    if deployment is None or state_name(deployment.status) not in FAILED_STATES:
        return None
    lines = [line for line in deployment.message.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else state_name(deployment.status)


def state_name(state: Any) -> str:
    """Serve's status enums, or plain strings on some paths, as plain strings."""
    return str(getattr(state, "value", state))


async def _until_deadline(
    deltas: DeploymentResponseGenerator, deadline: float, param: str, timeout_s: float
) -> AsyncIterator[list[TextDelta]]:
    """Pass the replica's stream on until it ends or the deadline passes.

    However it stops (the end, the deadline, or the client going away, when
    Starlette stops iterating), the replica's stream is cancelled, so the
    replica stops decoding these prompts.
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                yield await asyncio.wait_for(deltas.__anext__(), deadline - loop.time())
            except StopAsyncIteration:
                return
            except Exception as err:
                raise model_error(err, param, timeout_s) or err from None
    finally:
        _cancel(deltas)


def _cancel(deltas: DeploymentResponseGenerator) -> None:
    """Cancel a model call, best effort: a call that already failed re-raises
    its error from ``cancel()``, and has nothing left to cancel anyway."""
    with contextlib.suppress(Exception):
        deltas.cancel()


async def _accepted(deltas: DeploymentResponseGenerator, deadline: float) -> None:
    """Wait for the stream's first (empty) item: a replica took the request.

    A cold start happens here. If Serve gives up starting replicas meanwhile,
    fail with its reason rather than wait until the deadline.
    """
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(deltas.__anext__())
    try:
        while not first.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait({first}, timeout=min(START_CHECK_INTERVAL_S, remaining))
            if not first.done() and (failure := await asyncio.to_thread(_model_start_failure)):
                raise ApiError(503, f"the model deployment failed to start: {failure}")
        first.result()
    finally:
        first.cancel()


app = FastAPI(
    title="Ray Serve LLM",
    description="Serverless LLM inference on Ray Serve, scaling to zero.",
    exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    responses=ERROR_RESPONSES,
)
app.openapi = with_request_models(  # type: ignore[method-assign]
    app, [GenerateRequest, CompletionRequest, ChatCompletionRequest]
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

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=STREAMED,
        openapi_extra=json_body(GenerateRequest),
    )
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
    async def list_models(self, request: Request) -> dict[str, Any]:
        check_api_key(request, self.config.api_key)
        return {"object": "list", "data": [model_card(self.config.model_id, self.started)]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(self, request: Request, model: str) -> dict[str, Any]:
        check_api_key(request, self.config.api_key)
        self._check_model(model)
        return model_card(model, self.started)

    @app.post("/v1/completions", responses=STREAMED, openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        """OpenAI's completions: the prompt is completed as raw text, no template."""
        parsed = await self._parse(request, CompletionRequest, default_param="prompt")
        prompts = [Prompt(text=text, raw=True) for text in parsed.prompt_list()]
        return await self._openai(parsed, parsed.max_tokens, prompts, chat=False, param="prompt")

    @app.post(
        "/v1/chat/completions", responses=STREAMED, openapi_extra=json_body(ChatCompletionRequest)
    )
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
        """Key, content type, size, JSON, then fields: each refused with its own 4xx."""
        check_api_key(request, self.config.api_key)
        body = await read_json(request, self.config.max_body_bytes)
        limits = {
            "max_new_tokens": self.config.max_new_tokens,
            "max_prompts": self.config.max_prompts,
        }
        try:
            return model.model_validate(body, context=limits)
        except ValidationError as err:
            raise validation_error_to_api_error(err, default_param, body) from None

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
        """Whole replies, gathered from the model's stream of completions."""
        completions: dict[int, Completion] = {}
        async for batch in await self._open_stream(prompts, sampling, param, text=False):
            completions.update((d.index, d.completion) for d in batch if d.completion)
        return [completions[index] for index in range(len(prompts))]

    async def _stream(
        self, prompts: list[Prompt], sampling: Sampling, shape: StreamFormat, param: str
    ) -> StreamingResponse:
        deltas = await self._open_stream(prompts, sampling, param, text=True)
        return StreamingResponse(
            sse_body(deltas, shape), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _open_stream(
        self, prompts: list[Prompt], sampling: Sampling, param: str, text: bool
    ) -> AsyncIterator[list[TextDelta]]:
        """Call the model deployment and wait until a replica accepted the prompts.

        Waiting for the acceptance (a replica may first have to start) keeps a
        refusal such as a too-long prompt a proper 4xx instead of an error
        event inside a 200 stream. ``REQUEST_TIMEOUT_S`` covers the whole
        call, the wait included.
        """
        timeout_s = self.config.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        deltas: DeploymentResponseGenerator = self.llm.options(stream=True).stream.remote(
            prompts, sampling, text
        )
        try:
            await _accepted(deltas, deadline)
        except Exception as err:
            _cancel(deltas)
            raise model_error(err, param, timeout_s) or err from None
        return _until_deadline(deltas, deadline, param, timeout_s)

    async def _model_replica_states(self) -> dict[str, int]:
        """Replica counts by state, read from the Serve controller at most once a second."""
        now = time.monotonic()
        if now - self._replicas_read_at >= REPLICA_COUNT_TTL_S:
            self._replicas = await asyncio.to_thread(_read_replica_states)
            self._replicas_read_at = now
        return self._replicas
