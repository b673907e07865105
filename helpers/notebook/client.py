"""A small HTTP client for the app: the same calls a user makes with curl.

The notebooks talk to the server only through HTTP, like any real client, so
what they show (latencies, cold starts, error bodies) is what users get.
Streamed replies arrive as server-sent events (``data: {json}`` lines, then
``data: [DONE]``), read here line by line as the server sends them.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

from helpers.api.errors import error_status
from helpers.notebook.polling import wait_for

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Reply:
    """One completion and how long the round trip took."""

    prompt: str
    text: str
    latency_s: float
    generation_kwargs: dict[str, Any]
    """For a whole reply, what the server used, its defaults filled in; for a
    streamed one, the knobs sent (the events do not repeat them)."""
    first_text_s: float | None = None
    """Seconds until the first piece of text arrived, for a streamed reply."""
    completion_tokens: int | None = None
    """Tokens generated, as the server counted them, for a streamed reply."""
    cached_tokens: int | None = None
    """Of a streamed chat reply's prompt tokens, those its replica had
    computed already (its prefix cache: a chat's earlier turns)."""


class ApiError(RuntimeError):
    """The server refused a request; ``body`` is its JSON error object."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message", error) if isinstance(error, dict) else error or body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


def generate_body(
    prompt: str,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """The walkthrough's request body; unset knobs fall back to the server's defaults."""
    knobs = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    return {
        "prompt": prompt,
        "generation_kwargs": {k: v for k, v in knobs.items() if v is not None},
    }


TextCallback = Callable[[str], None]


class LLMClient:
    def __init__(
        self, base_url: str = DEFAULT_URL, timeout_s: float = 300, api_key: str | None = None
    ) -> None:
        """``api_key`` defaults to the ``API_KEY`` environment variable, the one
        the server reads: a notebook that set it for the deploy is let in."""
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = os.environ.get("API_KEY", "") if api_key is None else api_key
        self._model: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def model(self) -> str:
        """The served model's id, as the OpenAI endpoints want it named."""
        if self._model is None:
            self._model = str(self.healthz()["model"])
        return self._model

    def healthz(self) -> dict[str, Any]:
        """GET /healthz; raises :class:`ApiError` on a 4xx/5xx, like every call:
        a 503 (Serve's controller too slow to tell) is one a poll skips."""
        response = requests.get(f"{self.base_url}/healthz", timeout=10)
        _raise_if_refused(response)
        return response.json()

    def running_model_replicas(self) -> int:
        return int(self.healthz()["model_replicas"]["running"])

    def generate(self, prompt: str, **knobs: Any) -> Reply:
        """POST /generate; raises :class:`ApiError` with the server's JSON on a 4xx/5xx."""
        body = generate_body(prompt, **knobs)
        started = time.perf_counter()
        response = requests.post(
            f"{self.base_url}/generate", json=body, headers=self.headers, timeout=self.timeout_s
        )
        latency = time.perf_counter() - started
        _raise_if_refused(response)
        payload = response.json()
        return Reply(prompt, payload["completions"][0], latency, payload["generation_kwargs"])

    def stream_generate(self, prompt: str, on_text: TextCallback, **knobs: Any) -> Reply:
        """POST /generate with ``"stream": true``; ``on_text`` gets each piece as it arrives."""
        body = {**generate_body(prompt, **knobs), "stream": True}
        used = body["generation_kwargs"]
        return self._stream("/generate", body, prompt, used, on_text, lambda e: e.get("text"))

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        on_text: TextCallback,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Reply:
        """POST /v1/chat/completions, streamed; the reply is the assistant's next turn."""
        knobs = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        knobs = {k: v for k, v in knobs.items() if v is not None}
        body = {"model": self.model, "messages": messages, "stream": True, **knobs}
        body["stream_options"] = {"include_usage": True}  # the token count, last
        prompt = messages[-1]["content"] if messages else ""
        return self._stream("/v1/chat/completions", body, prompt, knobs, on_text, _chat_text)

    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        prompt: str,
        knobs: dict[str, Any],
        on_text: TextCallback,
        text_of: Callable[[dict[str, Any]], str | None],
    ) -> Reply:
        started = time.perf_counter()
        first_text_s, pieces, tokens, cached = None, [], None, None
        with requests.post(
            f"{self.base_url}{path}",
            json=body,
            headers=self.headers,
            stream=True,
            timeout=self.timeout_s,
        ) as response:
            _raise_if_refused(response)
            for event in sse_events(response.iter_lines(decode_unicode=True)):
                if "error" in event:  # the server failed after the stream began
                    raise ApiError(error_status(event["error"]), event)
                tokens = _completion_tokens(event, tokens)
                cached = _cached_tokens(event, cached)
                text = text_of(event)
                if text:
                    if first_text_s is None:
                        first_text_s = time.perf_counter() - started
                    pieces.append(text)
                    on_text(text)
        latency = time.perf_counter() - started
        return Reply(prompt, "".join(pieces), latency, knobs, first_text_s, tokens, cached)

    def wait_until_up(self, timeout_s: float = 300) -> None:
        """Block until /healthz answers (the app deployed and the proxy routing)."""
        wait_for(self._healthy, timeout_s, f"{self.base_url}/healthz to answer")

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def curl_command(self, prompt: str, **knobs: Any) -> str:
        """The same request as the walkthrough's curl command line.

        With an API key, the command reads it from ``$API_KEY`` rather than
        spelling it out, so printing the command never shows the key.
        """
        body = json.dumps(generate_body(prompt, **knobs))
        auth = '  -H "Authorization: Bearer $API_KEY" \\\n' if self.api_key else ""
        return (
            f"curl {self.base_url}/generate \\\n"
            f"  -H 'Content-Type: application/json' \\\n"
            f"{auth}"
            f"  -d {shlex.quote(body)}"
        )


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to ``data: [DONE]``.

    A stream cut off before ``[DONE]`` raises rather than passing for a
    complete reply.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, other fields
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise requests.ConnectionError("the stream ended before its [DONE] event")


def _completion_tokens(event: dict[str, Any], so_far: int | None) -> int | None:
    """The server's count of generated tokens, where ``event`` carries it:
    /generate's last event of a prompt, or a chat stream's usage chunk."""
    count = (event.get("usage") or event).get("completion_tokens")
    return count if isinstance(count, int) else so_far


def _cached_tokens(event: dict[str, Any], so_far: int | None) -> int | None:
    """The prompt tokens the replica had computed already, where ``event``
    is a chat stream's usage chunk."""
    details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
    count = details.get("cached_tokens")
    return count if isinstance(count, int) else so_far


def _chat_text(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content")


def _raise_if_refused(response: requests.Response) -> None:
    """:class:`ApiError` with the server's error body, for a 4xx/5xx: one
    error for every call, so a caller can act on its status."""
    if not response.ok:
        raise ApiError(response.status_code, _json_or_text(response))


def _json_or_text(response: requests.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500]}}
