"""The HTTP ingress: checks and validates requests, answers health probes,
forwards work, and turns every failure into a JSON answer.

It runs one small replica that never scales to zero. That matters for
scale-to-zero: ``/healthz`` and ``/v1/models`` are answered here from Serve's
own bookkeeping and the replicas' reports (:mod:`helpers.serve.model_report`),
so a load balancer probing every second neither keeps the model replica awake
nor wakes it from zero. Completions reach the model deployment through
``LLMServer.stream`` (sent on piece by piece, or gathered into one reply), and
``/tokenize`` and ``/detokenize`` through plain calls: only a replica holds
the tokenizer.
"""

import contextlib
import functools
import time
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from helpers.api.errors import (
    EXCEPTION_HANDLERS,
    ApiError,
    request_id,
    validation_error_to_api_error,
)
from helpers.api.generate_schema import GenerateRequest, GenerateResponse, UsedGenerationKwargs
from helpers.api.openai_responses import OpenAIFormat, model_card
from helpers.api.openai_schema import ChatCompletionRequest, CompletionRequest
from helpers.api.openapi_docs import ERROR_RESPONSES, STREAMED, json_body, with_request_models
from helpers.api.request_checks import check_api_key, read_json
from helpers.api.sampling_controls import SamplingControls
from helpers.api.sse import SSE_HEADERS, GenerateStream, StreamFormat, sse_body
from helpers.api.token_schema import DetokenizeRequest, TokenizeRequest
from helpers.config import ServeConfig
from helpers.protocol import Completion, Prompt, Sampling
from helpers.serve import model_report, spare_worker
from helpers.serve.llm_metrics import CountLLMRequests, IngressMetrics, note_stream_failure
from helpers.serve.model_calls import (
    ModelStatus,
    ModelStream,
    call_model,
    open_stream,
    read_model_view,
)
from helpers.serve.model_errors import RequestFields, retry_later

GENERATE_FIELDS = RequestFields("prompt", controls="generation_kwargs.")
GENERATE_PROMPTS_FIELDS = replace(GENERATE_FIELDS, prompt="prompts")

Body = TypeVar("Body", bound=BaseModel)


app = FastAPI(
    title="Ray Serve LLM",
    description="Serverless LLM inference on Ray Serve, scaling to zero.",
    exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    responses=ERROR_RESPONSES,
)
app.add_middleware(CountLLMRequests)
app.openapi = with_request_models(  # type: ignore[method-assign]
    app, [GenerateRequest, CompletionRequest, ChatCompletionRequest]
)


@serve.ingress(app)
class Ingress:
    """The always-on HTTP deployment: it checks each request, answers
    ``/healthz`` from Serve's status, and forwards completions to the model
    deployment through ``self.llm``. A health probe that reached the model
    would count as traffic and keep it from scaling to zero, so the probes
    stop here. Its options: :func:`helpers.serve.deployment_options.ingress_options`."""

    def __init__(
        self, llm: DeploymentHandle, config: ServeConfig, spare_key: str | None = None
    ) -> None:
        self.llm = llm
        self.config = config
        self.spare_key = spare_key
        self.started = int(time.time())
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        if spare_key:
            spare_worker.hold_key(spare_key, self._replica_id)
        self._report_key = model_report.report_key(context.app_name, config)
        read = functools.partial(read_model_view, context.app_name, self._report_key)
        self.model_status = ModelStatus(read)
        self._stopped = False
        CountLLMRequests.metrics = IngressMetrics() if config.llm_metrics == "on" else None

    def __del__(self) -> None:
        """Serve calls this when the app is deleted or redeployed: spare model
        processes made for this deployment have nothing more to wait for, and
        the model's report is of a deployment that is going. Once: the garbage
        collector may call it again after Serve did."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        if self.spare_key:
            spare_worker.release_key(self.spare_key, self._replica_id)
        model_report.forget(self._report_key)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, the model replicas by state, and what serves the model,
        from Serve's status and the replicas' reports: the model deployment is
        never called, so a probe neither wakes it nor queues behind its work."""
        try:
            view = await self.model_status.view()
        except Exception as err:
            raise retry_later(f"Serve's controller did not answer: {err!r}") from None
        report = view.report or {}
        return {
            "status": "ok",
            "model": self.config.model_id,
            "model_replicas": view.replica_states(),
            "min_replicas": self.config.min_replicas,
            "max_replicas": self.config.max_replicas,
            "engine": report.get("engine"),
            "model_start": report.get("model_start"),
            "spare_worker": self._spare_worker(),
        }

    def _spare_worker(self) -> dict[str, Any]:
        """Whether a spare model process waits on this node (``SPARE_WORKER``):
        ``ready`` with its pid, ``none``, or ``off``."""
        if not self.spare_key:
            return {"state": "off", "pid": None}
        pid = spare_worker.spare_pid(self.spare_key)
        return {"state": "ready" if pid else "none", "pid": pid}

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        response_model_exclude_none=True,
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
            **asked.model_dump(include=set(SamplingControls.model_fields)),
        )
        texts = parsed.prompt_list()
        prompts = [Prompt(text=text) for text in texts]
        sampling = Sampling(
            max_new_tokens=used.max_new_tokens,
            temperature=used.temperature,
            top_p=used.top_p,
            **asked.controls(),
        )
        # A refusal names the field the client sent: prompt, or prompts.
        fields = GENERATE_FIELDS if parsed.prompt is not None else GENERATE_PROMPTS_FIELDS
        if parsed.stream:
            return await self._stream(request, prompts, sampling, GenerateStream(), fields)
        completions = await self._complete(prompts, sampling, fields)
        return GenerateResponse(
            model=self.config.model_id,
            prompts=texts,
            completions=[c.text for c in completions],
            generation_kwargs=used,
        )

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        check_api_key(request, self.config.api_key)
        card = model_card(self.config.model_id, self.started, await self._engine_info())
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(self, request: Request, model: str) -> dict[str, Any]:
        check_api_key(request, self.config.api_key)
        self._check_model(model)
        return model_card(model, self.started, await self._engine_info())

    @app.post("/v1/completions", responses=STREAMED, openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        """OpenAI's completions: the prompt is completed as raw text, no template."""
        parsed = await self._parse(request, CompletionRequest, default_param="prompt")
        prompts = [
            Prompt(text=prompt, raw=True, echo=parsed.echo)
            if isinstance(prompt, str)
            else Prompt(token_ids=prompt, echo=parsed.echo)
            for prompt in parsed.prompt_list()
        ]
        fields = RequestFields("prompt")
        return await self._openai(
            request, parsed, parsed.max_tokens, prompts, chat=False, fields=fields
        )

    @app.post(
        "/v1/chat/completions", responses=STREAMED, openapi_extra=json_body(ChatCompletionRequest)
    )
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI's chat completions: the messages go through the chat template."""
        parsed = await self._parse(request, ChatCompletionRequest, default_param="messages")
        prompt = Prompt(
            messages=tuple(m.as_message() for m in parsed.messages),
            tools=parsed.offered_functions(),
        )
        fields = RequestFields("messages")
        return await self._openai(
            request, parsed, parsed.token_limit(), [prompt], chat=True, fields=fields
        )

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> JSONResponse:
        """vLLM's ``/tokenize``: the ids a prompt or a chat is read as, their
        count and the model's context length."""
        parsed = await self._parse(request, TokenizeRequest, default_param="prompt")
        self._check_model(parsed.model)
        if parsed.messages is not None:
            messages = tuple(m.as_message() for m in parsed.messages)
            prompt = Prompt(messages=messages, tools=parsed.functions())
            fields = RequestFields("messages")
        else:
            prompt, fields = Prompt(text=parsed.prompt or "", raw=True), RequestFields("prompt")
        call = self.llm.tokenize.remote(prompt, parsed.add_special_tokens)
        timeout_s = self.config.request_timeout_s
        return JSONResponse(await call_model(call, fields, timeout_s, self.model_status))

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> dict[str, str]:
        """vLLM's ``/detokenize``: the text of token ids."""
        parsed = await self._parse(request, DetokenizeRequest, default_param="tokens")
        self._check_model(parsed.model)
        call = self.llm.detokenize.remote(parsed.tokens)
        timeout_s = self.config.request_timeout_s
        return await call_model(call, RequestFields("tokens"), timeout_s, self.model_status)

    async def _openai(
        self,
        request: Request,
        parsed: CompletionRequest | ChatCompletionRequest,
        max_tokens: int | None,
        prompts: list[Prompt],
        *,
        chat: bool,
        fields: RequestFields,
    ) -> Any:
        self._check_model(parsed.model)
        sampling = Sampling(
            max_new_tokens=self.config.max_new_tokens if max_tokens is None else max_tokens,
            temperature=self.config.temperature
            if parsed.temperature is None
            else parsed.temperature,
            top_p=self.config.top_p if parsed.top_p is None else parsed.top_p,
            seed=parsed.seed,
            stop=parsed.stop_strings(),
            logprobs=parsed.logprob_count(),
            grammar=parsed.grammar(),
            **parsed.controls(),
        )
        self._check_token_budget(parsed.n, sampling.max_new_tokens, len(prompts))
        choices = [replace(prompt, choice=i) for prompt in prompts for i in range(parsed.n)]
        shape = OpenAIFormat(
            parsed.model,
            chat=chat,
            include_usage=parsed.include_usage(),
            choices=parsed.n,
            tool_calls=bool(prompts[0].tools),
        )
        if parsed.stream:
            return await self._stream(request, choices, sampling, shape, fields)
        # Encoded as it is, plain JSON already: FastAPI's jsonable_encoder would
        # walk every log probability first, on this one event loop.
        return JSONResponse(shape.response(await self._complete(choices, sampling, fields)))

    def _check_token_budget(self, n: int, max_tokens: int, prompts: int) -> None:
        """A request may ask for as many tokens as MAX_PROMPTS prompts of
        MAX_NEW_TOKENS each, however it spreads them over ``n`` and prompts."""
        budget = self.config.max_new_tokens * self.config.max_prompts
        if n * max_tokens * prompts > budget:
            raise ApiError(
                400,
                f"n: {n} choices x {max_tokens} tokens x {prompts} prompts asks for more than "
                f"{budget} tokens in all (MAX_NEW_TOKENS x MAX_PROMPTS)",
                "n",
            )

    async def _parse(self, request: Request, model: type[Body], default_param: str) -> Body:
        """Key, content type, size, JSON, then fields: each refused with its own 4xx."""
        check_api_key(request, self.config.api_key)
        body = await read_json(request, self.config.max_body_bytes, self.config.request_timeout_s)
        if not isinstance(body, dict):
            message = f"the request body must be a JSON object, with a {default_param!r} field"
            raise ApiError(400, message, default_param)
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
        self, prompts: list[Prompt], sampling: Sampling, fields: RequestFields
    ) -> list[Completion]:
        """Whole replies, gathered from the model's stream of completions."""
        completions: dict[int, Completion] = {}
        async for batch in await self._open_stream(prompts, sampling, fields, streamed=False):
            completions.update((d.index, d.completion) for d in batch if d.completion)
        return [completions[index] for index in range(len(prompts))]

    async def _stream(
        self,
        request: Request,
        prompts: list[Prompt],
        sampling: Sampling,
        shape: StreamFormat,
        fields: RequestFields,
    ) -> StreamingResponse:
        deltas = await self._open_stream(prompts, sampling, fields, streamed=True)
        body = sse_body(
            deltas,
            shape,
            request_id(request),
            on_error=lambda status: note_stream_failure(request, status),
        )
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _open_stream(
        self, prompts: list[Prompt], sampling: Sampling, fields: RequestFields, streamed: bool
    ) -> ModelStream:
        return await open_stream(
            self.llm,
            prompts,
            sampling,
            streamed=streamed,
            fields=fields,
            timeout_s=self.config.request_timeout_s,
            status=self.model_status,
        )

    async def _engine_info(self) -> dict[str, Any] | None:
        """What serves the model, as its replicas report it; None before one
        has started, or while Serve's controller does not answer."""
        with contextlib.suppress(Exception):
            return ((await self.model_status.view()).report or {}).get("engine")
        return None
