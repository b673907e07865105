"""Unit tests for helpers.notebook.prompt_box: the session logic and its headless widgets.

A fake client stands in for LLMClient, streaming each reply in a few pieces
and counting them as the server counts tokens, so no server or model is involved.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import requests

from helpers.notebook import prompt_box
from helpers.notebook.client import ApiError, Reply
from helpers.notebook.prompt_box import PromptBox, PromptSession, transcript_html

BAD_BODY = {"error": {"message": "max_new_tokens is too large", "param": "max_new_tokens"}}
MIDWAY_BODY = {"error": {"message": "internal error: the stream ended early"}}
LATENCY_S = 0.25
FIRST_TEXT_S = 0.05


def pieces_of(prompt: str) -> list[str]:
    """What the fake model streams for a prompt: "reply to <prompt>" in three pieces."""
    return [] if prompt == "silence" else ["reply ", "to ", prompt]


class FakeClient:
    """Records stream_generate() and stream_chat() calls and streams pieces_of(prompt).

    A prompt (or last chat message) of "bad" is refused with a 400, "offline"
    fails to connect, "html-error" is refused with HTML in its message, and
    "fail-midway" streams one piece before an error event. ``after_piece``, when
    set, runs after each piece has gone to on_text.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.after_piece: Callable[[], None] | None = None

    def stream_generate(self, prompt: str, on_text: Callable[[str], None], **knobs: Any) -> Reply:
        self.calls.append(("generate", prompt, knobs))
        return self._stream(prompt, on_text, knobs)

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        on_text: Callable[[str], None],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Reply:
        knobs = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.calls.append(("chat", copy.deepcopy(messages), knobs))
        return self._stream(messages[-1]["content"], on_text, knobs)

    def _stream(self, prompt: str, on_text: Callable[[str], None], knobs: dict[str, Any]) -> Reply:
        if prompt == "bad":
            raise ApiError(400, BAD_BODY)
        if prompt == "offline":
            raise requests.ConnectionError("connection refused")
        if prompt == "html-error":
            raise ApiError(400, {"error": {"message": "no <script> & such"}})
        pieces = pieces_of(prompt)
        for number, piece in enumerate(pieces):
            on_text(piece)
            if self.after_piece is not None:
                self.after_piece()
            if prompt == "fail-midway" and number == 0:
                raise ApiError(200, MIDWAY_BODY)
        first = FIRST_TEXT_S if pieces else None
        tokens = None if prompt == "uncounted" else len(pieces)
        return Reply(prompt, "".join(pieces), LATENCY_S, dict(knobs), first, tokens)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# -- PromptSession ---------------------------------------------------------------------------


def test_session_defaults(client: FakeClient) -> None:
    session = PromptSession(client)
    assert (session.max_new_tokens, session.temperature, session.top_p) == (64, 0.7, 0.9)
    assert session.mode == "complete"
    assert session.history == []
    assert session.conversation == []
    assert session.last_reply is None
    assert session.last_error is None


def test_send_passes_the_current_settings(client: FakeClient) -> None:
    session = PromptSession(client, max_new_tokens=12, temperature=0.3, top_p=0.6)
    reply = session.send("first")
    assert client.calls == [
        ("generate", "first", {"max_new_tokens": 12, "temperature": 0.3, "top_p": 0.6})
    ]
    assert reply is not None
    assert reply.text == "reply to first"
    assert session.last_reply is reply
    assert session.history == [reply]
    assert session.last_error is None

    session.max_new_tokens, session.temperature, session.top_p = 5, 0.0, 1.0
    second = session.send("second")
    assert client.calls[-1] == (
        "generate",
        "second",
        {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0},
    )
    assert session.history == [reply, second]
    assert session.last_reply is second


def test_send_streams_the_pieces_into_on_text(client: FakeClient) -> None:
    pieces: list[str] = []
    reply = PromptSession(client).send("it", on_text=pieces.append)
    assert pieces == ["reply ", "to ", "it"]
    assert reply is not None
    assert reply.text == "".join(pieces)


@pytest.mark.parametrize("mode", ["complete", "chat"])
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_sends_nothing(client: FakeClient, prompt: str, mode: str) -> None:
    session = PromptSession(client, mode=mode)
    assert session.send(prompt) is None
    assert client.calls == []
    assert session.history == []
    assert session.conversation == []
    assert session.last_error == "Type a prompt first."


def test_api_error_is_kept_not_raised(client: FakeClient) -> None:
    session = PromptSession(client)
    good = session.send("good")
    assert session.send("bad") is None
    assert session.last_error == "HTTP 400: max_new_tokens is too large"
    assert len(client.calls) == 2
    assert session.history == [good]  # the failure is not recorded as a reply
    assert session.last_reply is good


def test_connection_error_is_kept_not_raised(client: FakeClient) -> None:
    session = PromptSession(client)
    assert session.send("offline") is None
    assert session.last_error == "connection refused"
    assert session.history == []


def test_a_successful_send_clears_the_last_error(client: FakeClient) -> None:
    session = PromptSession(client)
    session.send("bad")
    assert session.last_error is not None
    session.send("good")
    assert session.last_error is None


def test_unknown_mode_sets_last_error_and_sends_nothing(client: FakeClient) -> None:
    session = PromptSession(client, mode="shout")
    assert session.send("hello") is None
    assert session.last_error == "Unknown mode 'shout': use one of complete, chat."
    assert client.calls == []
    assert session.history == []
    assert session.conversation == []


def test_chat_sends_the_whole_conversation_each_turn(client: FakeClient) -> None:
    session = PromptSession(client, max_new_tokens=12, temperature=0.3, top_p=0.6, mode="chat")
    first = session.send("hi")
    second = session.send("more")
    knobs = {"max_tokens": 12, "temperature": 0.3, "top_p": 0.6}
    assert client.calls == [
        ("chat", [user("hi")], knobs),
        ("chat", [user("hi"), assistant("reply to hi"), user("more")], knobs),
    ]
    assert session.conversation == [
        user("hi"),
        assistant("reply to hi"),
        user("more"),
        assistant("reply to more"),
    ]
    assert session.history == [first, second]
    assert second is not None
    assert second.text == "reply to more"


def test_a_failed_chat_turn_is_not_added_to_the_conversation(client: FakeClient) -> None:
    session = PromptSession(client, mode="chat")
    session.send("hi")
    assert session.send("bad") is None
    assert session.send("fail-midway") is None
    assert session.last_error == "HTTP 200: internal error: the stream ended early"
    assert session.conversation == [user("hi"), assistant("reply to hi")]
    session.send("again")
    assert client.calls[-1][1] == [user("hi"), assistant("reply to hi"), user("again")]


def test_new_chat_clears_the_conversation(client: FakeClient) -> None:
    session = PromptSession(client, mode="chat")
    session.send("hi")
    session.send("more")
    assert len(session.conversation) == 4
    session.new_chat()
    assert session.conversation == []
    session.send("fresh")
    assert client.calls[-1][1] == [user("fresh")]
    assert session.conversation == [user("fresh"), assistant("reply to fresh")]


def test_complete_mode_keeps_no_conversation(client: FakeClient) -> None:
    session = PromptSession(client)
    session.send("one")
    session.send("two")
    assert [call[0] for call in client.calls] == ["generate", "generate"]
    assert client.calls[1][1] == "two"  # the prompt alone, nothing said before
    assert session.conversation == []


# -- transcript_html -------------------------------------------------------------------------


def test_transcript_html_escapes_and_separates_turns() -> None:
    page = transcript_html([("You", "a < b & c"), ("<i>Model</i>", 'say "hi"')])
    assert page == (
        '<pre style="white-space: pre-wrap; margin: 0">'
        "<b>You:</b> a &lt; b &amp; c"
        "\n\n"
        "<b>&lt;i&gt;Model&lt;/i&gt;:</b> say &quot;hi&quot;"
        "</pre>"
    )


# -- PromptBox (ipywidgets, headless) --------------------------------------------------------


def test_box_starts_from_the_session_settings(client: FakeClient) -> None:
    session = PromptSession(client, max_new_tokens=20, temperature=0.4, top_p=0.55, mode="chat")
    box = PromptBox(session)
    assert box.mode.value == "chat"
    assert box.max_new_tokens.value == 20
    assert box.temperature.value == pytest.approx(0.4)
    assert box.top_p.value == pytest.approx(0.55)
    assert box.prompt.value  # a sample prompt is filled in
    assert box.send_button.disabled is False
    assert box.reply.value == ""
    assert box.status.value == ""
    children = list(box.widget.children)
    assert children[:5] == [box.mode, box.prompt, box.max_new_tokens, box.temperature, box.top_p]
    assert list(children[5].children) == [box.send_button, box.new_chat_button]
    assert children[6:] == [box.reply, box.status]


def test_click_sends_the_widget_values(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "Tell me about Ray."
    box.max_new_tokens.value = 33
    box.temperature.value = 1.25
    box.top_p.value = 0.5
    box.send_button.click()

    assert client.calls == [
        (
            "generate",
            "Tell me about Ray.",
            {"max_new_tokens": 33, "temperature": 1.25, "top_p": 0.5},
        )
    ]
    assert (session.max_new_tokens, session.temperature, session.top_p) == (33, 1.25, 0.5)
    assert session.last_reply is not None
    assert session.last_reply.text == "reply to Tell me about Ray."
    assert session.last_error is None
    assert box.send_button.disabled is False
    assert box.reply.value == transcript_html(
        [("You", "Tell me about Ray."), ("Model", "reply to Tell me about Ray.")]
    )
    assert box.status.value == "[0.25 s, first text after 0.05 s, 3 tokens]"  # the server's count


def test_a_reply_without_a_token_count_shows_none(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "uncounted"
    box.send_button.click()
    assert box.status.value == "[0.25 s, first text after 0.05 s]"


def test_reply_shows_the_text_while_it_streams(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "go"
    seen: list[str] = []
    client.after_piece = lambda: seen.append(box.reply.value)
    box.send_button.click()

    assert seen == [
        transcript_html([("You", "go"), ("Model", "reply ")]),
        transcript_html([("You", "go"), ("Model", "reply to ")]),
        transcript_html([("You", "go"), ("Model", "reply to go")]),
    ]
    assert len(seen[0]) < len(seen[1]) < len(seen[2])
    assert box.reply.value == seen[-1]


def test_an_empty_reply_still_shows_the_turn(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "silence"
    box.send_button.click()
    assert box.reply.value == transcript_html([("You", "silence"), ("Model", "")])
    assert box.status.value == "[0.25 s, 0 tokens]"  # no first text to time


def test_html_in_a_reply_is_escaped(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "<script>alert(1)</script> & <b>"
    box.send_button.click()
    assert "<script>" not in box.reply.value
    assert "<b>alert" not in box.reply.value
    assert "reply to &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in box.reply.value


def test_html_in_an_error_is_escaped(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "html-error"
    box.send_button.click()
    assert box.status.value == "<b>Error:</b> HTTP 400: no &lt;script&gt; &amp; such"


def test_click_with_a_refused_request_shows_the_error(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "bad"
    box.send_button.click()

    assert len(client.calls) == 1
    assert session.last_reply is None
    assert session.last_error == "HTTP 400: max_new_tokens is too large"
    assert box.send_button.disabled is False
    assert box.status.value == "<b>Error:</b> HTTP 400: max_new_tokens is too large"
    assert box.reply.value.endswith("<b>You:</b> bad</pre>")  # the turn, no reply


def test_an_error_mid_stream_keeps_the_text_so_far(client: FakeClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "fail-midway"
    box.send_button.click()
    assert box.reply.value == transcript_html([("You", "fail-midway"), ("Model", "reply ")])
    assert box.status.value == ("<b>Error:</b> HTTP 200: internal error: the stream ended early")


def test_click_with_an_empty_prompt_sends_nothing(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "  "
    box.send_button.click()
    assert client.calls == []
    assert session.last_error == "Type a prompt first."
    assert box.status.value == "<b>Error:</b> Type a prompt first."
    assert box.reply.value == ""


def test_chat_in_the_box_shows_and_sends_the_conversation(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.mode.value = "chat"
    box.prompt.value = "hi"
    box.send_button.click()
    box.prompt.value = "more"
    box.send_button.click()

    assert session.mode == "chat"
    assert [call[0] for call in client.calls] == ["chat", "chat"]
    assert client.calls[1][1] == [user("hi"), assistant("reply to hi"), user("more")]
    assert box.reply.value == transcript_html(
        [
            ("You", "hi"),
            ("Model", "reply to hi"),
            ("You", "more"),
            ("Model", "reply to more"),
        ]
    )


def test_new_chat_button_clears_the_conversation_and_the_reply(client: FakeClient) -> None:
    session = PromptSession(client, mode="chat")
    box = PromptBox(session)
    box.prompt.value = "hi"
    box.send_button.click()
    assert session.conversation != []
    assert box.reply.value != ""

    box.new_chat_button.click()
    assert session.conversation == []
    assert box.reply.value == ""
    assert box.status.value == "New chat started."

    box.prompt.value = "fresh"
    box.send_button.click()
    assert client.calls[-1][1] == [user("fresh")]
    assert box.reply.value == transcript_html([("You", "fresh"), ("Model", "reply to fresh")])


def test_button_is_disabled_while_sending_and_re_enabled_after(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    states: list[tuple[bool, str]] = []
    real_stream_generate = client.stream_generate

    def stream_generate(prompt: str, on_text: Callable[[str], None], **knobs: Any) -> Reply:
        states.append((box.send_button.disabled, box.status.value))
        return real_stream_generate(prompt, on_text, **knobs)

    client.stream_generate = stream_generate  # type: ignore[method-assign]
    box.send_button.click()
    assert states == [(True, "Waiting for the model (a cold start takes a few seconds)...")]
    assert box.send_button.disabled is False
    assert session.last_reply is not None


def test_button_is_re_enabled_when_the_client_raises(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    disabled_during: list[bool] = []

    def stream_generate(prompt: str, on_text: Callable[[str], None], **knobs: Any) -> Reply:
        disabled_during.append(box.send_button.disabled)
        raise ConnectionError("server gone")  # not a requests error: the session lets it out

    client.stream_generate = stream_generate  # type: ignore[method-assign]
    box.send_button.click()  # ipywidgets logs a callback's exception rather than raising it
    assert disabled_during == [True]
    assert box.send_button.disabled is False
    assert session.last_reply is None


def test_every_label_has_room_for_its_whole_name(client: FakeClient) -> None:
    """ipywidgets' default label width cut "max_new_tokens" to "max_new…"."""
    box = PromptBox(PromptSession(client))
    labelled = [box.prompt, box.max_new_tokens, box.temperature, box.top_p]
    widths = {widget.style.description_width for widget in labelled}
    assert widths == {prompt_box.LABEL_WIDTH}
    pixels = int(prompt_box.LABEL_WIDTH.removesuffix("px"))
    assert all(len(widget.description) * 8 <= pixels for widget in labelled)
