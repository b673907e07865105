"""The HTTP ingress: validates requests, answers health probes, forwards work.

It runs one small replica that never scales to zero. That matters for
scale-to-zero: ``/healthz`` is answered here from Serve's own bookkeeping, so
a load balancer probing every second neither keeps the model replica awake
nor wakes it from zero. Only ``/generate`` reaches the model deployment.
"""

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from helpers.api_schema import GenerateRequest, GenerateResponse, UsedGenerationKwargs
from helpers.config import ServeConfig
from helpers.engine import PromptTooLongError
from helpers.errors import EXCEPTION_HANDLERS, ApiError, validation_error_to_api_error

MODEL_DEPLOYMENT = "LLMServer"
REPLICA_COUNT_TTL_S = 1.0


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
    async def generate(self, request: Request) -> GenerateResponse:
        body = await _json_body(request)
        try:
            parsed = GenerateRequest.model_validate(
                body,
                context={
                    "max_new_tokens": self.config.max_new_tokens,
                    "max_prompts": self.config.max_prompts,
                },
            )
        except ValidationError as err:
            raise validation_error_to_api_error(err, default_param="prompt") from None
        asked = parsed.generation_kwargs
        used = UsedGenerationKwargs(
            max_new_tokens=asked.max_new_tokens or self.config.max_new_tokens,
            temperature=self.config.temperature if asked.temperature is None else asked.temperature,
            top_p=self.config.top_p if asked.top_p is None else asked.top_p,
        )
        prompts = parsed.prompt_list()
        try:
            completions = await self.llm.generate.remote(prompts, **used.model_dump())
        except PromptTooLongError as err:
            # Ray re-raises the replica's exception wrapped with its remote
            # traceback; only the original message belongs in the response.
            raise ApiError(400, f"prompt: {getattr(err, 'cause', err)}", "prompt") from None
        return GenerateResponse(
            model=self.config.model_id,
            prompts=prompts,
            completions=[c.text for c in completions],
            generation_kwargs=used,
        )

    async def _model_replica_states(self) -> dict[str, int]:
        """Replica counts by state, read from the Serve controller at most once a second."""
        now = time.monotonic()
        if now - self._replicas_read_at >= REPLICA_COUNT_TTL_S:
            self._replicas = await asyncio.to_thread(_read_replica_states)
            self._replicas_read_at = now
        return self._replicas
