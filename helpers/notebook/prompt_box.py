"""The notebooks' prompt box: a plain class that talks to the server, and a
thin ipywidgets layer over it.

Keeping the logic in :class:`PromptSession` lets tests drive it without a
browser; :class:`PromptBox` only wires widgets to it. Headless, a notebook
calls :meth:`PromptBox.ask`, which sets every widget, presses Send and
returns that send's reply, whatever was typed or clicked in the box before.

Replies stream: text shows as the model produces it. In chat mode the session
keeps the conversation and sends all of it with every turn, through
``/v1/chat/completions``, so the model sees what was said before.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import requests

from helpers.notebook.client import ApiError, LLMClient, Reply

MODES = ("complete", "chat")
# The box's starting settings, and what PromptBox.ask sends unless told otherwise.
MAX_NEW_TOKENS = 64
TEMPERATURE = 0.7
TOP_P = 0.9


LABEL_WIDTH = "120px"  # room for the longest label, "max_new_tokens"


class PromptSession:
    """The prompt box's state and behaviour, with no widgets involved."""

    def __init__(
        self,
        client: LLMClient,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = TEMPERATURE,
        top_p: float = TOP_P,
        mode: str = "complete",
    ) -> None:
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.mode = mode
        self.history: list[Reply] = []
        self.conversation: list[dict[str, str]] = []
        self.last_error: str | None = None

    @property
    def last_reply(self) -> Reply | None:
        return self.history[-1] if self.history else None

    def send(self, prompt: str, on_text: Callable[[str], None] | None = None) -> Reply | None:
        """Send one prompt (or chat turn) with the current settings, streaming the
        reply into ``on_text``; errors are kept in ``last_error``, not raised."""
        self.last_error = None
        if not prompt.strip():
            self.last_error = "Type a prompt first."
            return None
        if self.mode not in MODES:
            self.last_error = f"Unknown mode {self.mode!r}: use one of {', '.join(MODES)}."
            return None
        sink = on_text or (lambda _: None)
        try:
            reply = (
                self._chat(prompt, sink) if self.mode == "chat" else self._complete(prompt, sink)
            )
        except (ApiError, requests.RequestException) as err:
            self.last_error = str(err)
            return None
        self.history.append(reply)
        return reply

    def new_chat(self) -> None:
        """Forget the conversation; the next chat turn starts afresh."""
        self.conversation.clear()

    def _complete(self, prompt: str, on_text: Callable[[str], None]) -> Reply:
        return self.client.stream_generate(
            prompt,
            on_text,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )

    def _chat(self, prompt: str, on_text: Callable[[str], None]) -> Reply:
        turn = {"role": "user", "content": prompt}
        reply = self.client.stream_chat(
            [*self.conversation, turn],
            on_text,
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
        )
        self.conversation += [turn, {"role": "assistant", "content": reply.text}]
        return reply


def transcript_html(turns: list[tuple[str, str]]) -> str:
    """Turns of (speaker, text) as preformatted HTML, escaped."""
    lines = [f"<b>{html.escape(who)}:</b> {html.escape(text)}" for who, text in turns]
    return '<pre style="white-space: pre-wrap; margin: 0">' + "\n\n".join(lines) + "</pre>"


class PromptBox:
    """Mode switch, text area, three sliders, Send and New chat buttons, the reply."""

    def __init__(self, session: PromptSession) -> None:
        import ipywidgets as widgets

        self.session = session
        # ipywidgets' default label width cuts "max_new_tokens" to "max_new…";
        # one width for every label keeps the inputs aligned too.
        label = {"description_width": LABEL_WIDTH}
        self.mode = widgets.ToggleButtons(
            options=[("Complete", "complete"), ("Chat", "chat")], value=session.mode
        )
        self.prompt = widgets.Textarea(
            value="Write a haiku about Ray Serve.",
            description="Prompt",
            style=label,
            layout=widgets.Layout(width="100%", height="80px"),
        )
        self.max_new_tokens = widgets.IntSlider(
            value=session.max_new_tokens, min=1, max=256, description="max_new_tokens", style=label
        )
        self.temperature = widgets.FloatSlider(
            value=session.temperature,
            min=0.0,
            max=2.0,
            step=0.05,
            description="temperature",
            style=label,
        )
        self.top_p = widgets.FloatSlider(
            value=session.top_p, min=0.05, max=1.0, step=0.05, description="top_p", style=label
        )
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.new_chat_button = widgets.Button(description="New chat")
        self.reply = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.status = widgets.HTML()
        self.send_button.on_click(self._on_send)
        self.new_chat_button.on_click(self._on_new_chat)
        self.widget = widgets.VBox(
            [
                self.mode,
                self.prompt,
                self.max_new_tokens,
                self.temperature,
                self.top_p,
                widgets.HBox([self.send_button, self.new_chat_button]),
                self.reply,
                self.status,
            ]
        )

    def ask(
        self,
        prompt: str,
        *,
        mode: str = "complete",
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = TEMPERATURE,
        top_p: float = TOP_P,
    ) -> Reply:
        """Set every widget, the mode included, press Send and return that
        send's reply.

        What a notebook cell sends then depends on its own arguments only,
        not on what a learner typed, clicked or left in the box before, and
        the reply it keeps is this send's, however many came before it.
        Send's handler is called directly rather than through
        ``send_button.click()``, whose dispatcher would log an unexpected
        error and let the cell carry on. A refused send raises RuntimeError
        with the error the box shows.
        """
        knobs = (
            (self.max_new_tokens, max_new_tokens),
            (self.temperature, temperature),
            (self.top_p, top_p),
        )
        for slider, value in knobs:  # a slider clamps what lies beyond its ends
            if not slider.min <= value <= slider.max:
                raise ValueError(
                    f"{slider.description}={value} is outside the box's range "
                    f"[{slider.min}, {slider.max}]"
                )
        self.mode.value, self.prompt.value = mode, prompt
        for slider, value in knobs:
            slider.value = value
        reply = self._on_send(self.send_button)
        if reply is None:
            raise RuntimeError(self.session.last_error)
        return reply

    def _on_send(self, _: Any) -> Reply | None:
        """Send's handler: the widgets' values go to the session, the reply
        streams into the box. Returns the reply (None when refused) for
        :meth:`ask`; ipywidgets ignores it."""
        session = self.session
        session.mode = self.mode.value
        session.max_new_tokens = self.max_new_tokens.value
        session.temperature = self.temperature.value
        session.top_p = self.top_p.value
        earlier = self._earlier_turns()
        prompt, streamed = self.prompt.value, []

        def show(text: str) -> None:
            streamed.append(text)
            self.reply.value = transcript_html(
                [*earlier, ("You", prompt), ("Model", "".join(streamed))]
            )

        if prompt.strip():
            self.reply.value = transcript_html([*earlier, ("You", prompt)])
        self.send_button.disabled = True
        self.status.value = "Waiting for the model (a cold start takes a few seconds)..."
        try:
            reply = session.send(prompt, on_text=show)
        except Exception as err:  # a bug, not a refusal: show it, then let ipywidgets log it
            self.status.value = f"<b>Error:</b> {html.escape(repr(err))}"
            raise
        finally:
            self.send_button.disabled = False
        if reply is None:
            self.status.value = f"<b>Error:</b> {html.escape(str(session.last_error))}"
            return None
        if not streamed:  # an empty reply: still show the turn
            show(reply.text)
        first = f", first text after {reply.first_text_s:.2f} s" if reply.first_text_s else ""
        tokens = "" if reply.completion_tokens is None else f", {reply.completion_tokens} tokens"
        cached = f", {reply.cached_tokens} prompt tokens cached" if reply.cached_tokens else ""
        self.status.value = f"[{reply.latency_s:.2f} s{first}{tokens}{cached}]"
        return reply

    def _earlier_turns(self) -> list[tuple[str, str]]:
        """In chat mode, the conversation so far; otherwise nothing."""
        if self.session.mode != "chat":
            return []
        speakers = {"user": "You", "assistant": "Model"}
        return [(speakers[m["role"]], m["content"]) for m in self.session.conversation]

    def _on_new_chat(self, _: Any) -> None:
        self.session.new_chat()
        self.reply.value = ""
        self.status.value = "New chat started."

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
