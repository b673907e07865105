"""A small HTTP client for the app: the same calls a user makes with curl.

The notebooks talk to the server only through HTTP, like any real client, so
what they show (latencies, cold starts, error bodies) is what users get.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Reply:
    """One completion and how long the round trip took."""

    prompt: str
    text: str
    latency_s: float
    generation_kwargs: dict[str, Any]


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


class LLMClient:
    def __init__(self, base_url: str = DEFAULT_URL, timeout_s: float = 300) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def healthz(self) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/healthz", timeout=10)
        response.raise_for_status()
        return response.json()

    def running_model_replicas(self) -> int:
        return int(self.healthz()["model_replicas"]["running"])

    def generate(self, prompt: str, **knobs: Any) -> Reply:
        """POST /generate; raises :class:`ApiError` with the server's JSON on a 4xx/5xx."""
        body = generate_body(prompt, **knobs)
        started = time.perf_counter()
        response = requests.post(f"{self.base_url}/generate", json=body, timeout=self.timeout_s)
        latency = time.perf_counter() - started
        if not response.ok:
            raise ApiError(response.status_code, _json_or_text(response))
        payload = response.json()
        return Reply(prompt, payload["completions"][0], latency, payload["generation_kwargs"])

    def wait_until_up(self, timeout_s: float = 300) -> None:
        """Block until /healthz answers (the app deployed and the proxy routing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                requests.get(f"{self.base_url}/healthz", timeout=2).raise_for_status()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def curl_command(self, prompt: str, **knobs: Any) -> str:
        """The same request as the walkthrough's curl command line."""
        body = json.dumps(generate_body(prompt, **knobs))
        return (
            f"curl {self.base_url}/generate \\\n"
            f"  -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}"
        )


def _json_or_text(response: requests.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500]}}
