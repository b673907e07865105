"""The notebooks' prompt box: a plain class that talks to the server, and a
thin ipywidgets layer over it.

Keeping the logic in :class:`PromptSession` lets tests drive it without a
browser; :class:`PromptBox` only wires widgets to it. Headless, a notebook
sets the widgets' ``.value``, calls ``send_button.click()`` and reads
``session.last_reply`` in the next cell.
"""

from __future__ import annotations

import functools
from typing import Any

import requests

from helpers.client import ApiError, LLMClient, Reply


class PromptSession:
    """The prompt box's state and behaviour, with no widgets involved."""

    def __init__(
        self,
        client: LLMClient,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 0.9,
    ) -> None:
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.history: list[Reply] = []
        self.last_error: str | None = None

    @property
    def last_reply(self) -> Reply | None:
        return self.history[-1] if self.history else None

    def send(self, prompt: str) -> Reply | None:
        """Send one prompt with the current settings; errors are kept, not raised."""
        self.last_error = None
        if not prompt.strip():
            self.last_error = "Type a prompt first."
            return None
        try:
            reply = self.client.generate(
                prompt,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )
        except (ApiError, requests.RequestException) as err:
            self.last_error = str(err)
            return None
        self.history.append(reply)
        return reply

    def count_tokens(self, text: str) -> int:
        """Tokens in a reply, counted with the served model's tokenizer when it is local."""
        tokenizer = _local_tokenizer()
        return (
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokenizer
            else len(text.split())
        )


@functools.cache
def _local_tokenizer() -> Any:
    from helpers.config import ServeConfig
    from helpers.engine import load_tokenizer

    config = ServeConfig.from_env()
    try:
        return load_tokenizer(config.model_id, config.model_cache_dir)
    except Exception:  # a hub model not cached here: fall back to words
        return None


class PromptBox:
    """Text area, three sliders, a Send button and an output area."""

    def __init__(self, session: PromptSession) -> None:
        import ipywidgets as widgets

        self.session = session
        self.prompt = widgets.Textarea(
            value="Write a haiku about Ray Serve.",
            description="Prompt",
            layout=widgets.Layout(width="100%", height="80px"),
        )
        self.max_new_tokens = widgets.IntSlider(
            value=session.max_new_tokens, min=1, max=256, description="max_new_tokens"
        )
        self.temperature = widgets.FloatSlider(
            value=session.temperature, min=0.0, max=2.0, step=0.05, description="temperature"
        )
        self.top_p = widgets.FloatSlider(
            value=session.top_p, min=0.05, max=1.0, step=0.05, description="top_p"
        )
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.output = widgets.Output()
        self.send_button.on_click(self._on_send)
        self.widget = widgets.VBox(
            [
                self.prompt,
                self.max_new_tokens,
                self.temperature,
                self.top_p,
                self.send_button,
                self.output,
            ]
        )

    def _on_send(self, _: Any) -> None:
        self.session.max_new_tokens = self.max_new_tokens.value
        self.session.temperature = self.temperature.value
        self.session.top_p = self.top_p.value
        self.send_button.disabled = True
        try:
            reply = self.session.send(self.prompt.value)
        finally:
            self.send_button.disabled = False
        self.output.clear_output()
        with self.output:
            if reply is None:
                print(f"Error: {self.session.last_error}")
            else:
                tokens = self.session.count_tokens(reply.text)
                print(reply.text)
                print(f"\n[{reply.latency_s:.2f} s, {tokens} tokens]")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
