"""Unit tests for helpers.notebook.prompt_box: the session logic and its headless widgets.

The session talks to the fake ingress (``server``, see ``fake_ingress``)
through the real :class:`LLMClient`, so a change to the client's calls or
replies shows here. It streams ``STREAM_PIECES`` whatever the prompt, refuses
"bad" with a 400, and fails "fail-midway" after one piece. A scripted client
stands in only where that server cannot answer as needed; its methods keep
LLMClient's signatures, which a test checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import threading
from typing import Any

import pytest

from helpers.notebook import prompt_box
from helpers.notebook.client import ApiError, LLMClient, Reply, TextCallback
from helpers.notebook.prompt_box import PromptBox, PromptSession, transcript_html
from tests.unit.notebook.fake_ingress import BAD_BODY, MODEL_ID, STREAM_PIECES, FakeServer

TEXT = "".join(STREAM_PIECES)
REFUSED = f"HTTP 400: {BAD_BODY['error']['message']}"
MIDWAY = "HTTP 500: internal error: the stream ended early"
WAITING = "Waiting for the model (a cold start takes a few seconds)..."


class ScriptedClient:
    """Answers every call with ``outcome``: a reply, its text streamed as one
    piece, or an exception raised. For what the fake ingress cannot send: a
    reply without a token count, HTML in a reply or an error message, and an
    exception that is no HTTP failure."""

    def __init__(self, outcome: Reply | Exception) -> None:
        self.outcome = outcome
        self.calls = 0

    def stream_generate(self, prompt: str, on_text: TextCallback, **knobs: Any) -> Reply:
        return self._answer(on_text)

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        on_text: TextCallback,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Reply:
        return self._answer(on_text)

    def _answer(self, on_text: TextCallback) -> Reply:
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if self.outcome.text:
            on_text(self.outcome.text)
        return self.outcome


def scripted_reply(text: str, completion_tokens: int | None) -> Reply:
    return Reply("p", text, 0.25, {}, 0.05 if text else None, completion_tokens)


@pytest.fixture
def client(server: FakeServer) -> LLMClient:
    return LLMClient(server.url)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def chat_body(messages: list[dict[str, str]], **knobs: Any) -> dict[str, Any]:
    """What LLMClient.stream_chat sends for ``messages``."""
    return {
        "model": MODEL_ID,
        "messages": messages,
        "stream": True,
        **knobs,
        "stream_options": {"include_usage": True},
    }


def status_pattern(tokens: int, first_text: bool = True) -> str:
    """The status line after a reply: its latency and first text vary, its count does not."""
    first = r", first text after \d+\.\d\d s" if first_text else ""
    return rf"\[\d+\.\d\d s{first}, {tokens} tokens\]"


def test_the_scripted_client_keeps_llmclients_signatures() -> None:
    for name in ("stream_generate", "stream_chat"):
        scripted = inspect.signature(getattr(ScriptedClient, name), eval_str=True)
        real = inspect.signature(getattr(LLMClient, name), eval_str=True)
        assert scripted == real, name


# -- PromptSession ---------------------------------------------------------------------------


def test_session_defaults(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client)
    assert (session.max_new_tokens, session.temperature, session.top_p) == (64, 0.7, 0.9)
    assert session.mode == "complete"
    assert session.history == []
    assert session.conversation == []
    assert session.last_reply is None
    assert session.last_error is None
    assert server.paths == []


def test_send_passes_the_current_settings(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client, max_new_tokens=12, temperature=0.3, top_p=0.6)
    reply = session.send("first")
    first_knobs = {"max_new_tokens": 12, "temperature": 0.3, "top_p": 0.6}
    assert server.received == [
        {"prompt": "first", "generation_kwargs": first_knobs, "stream": True}
    ]
    assert reply is not None
    assert reply.text == TEXT
    assert reply.generation_kwargs == first_knobs
    assert session.last_reply is reply
    assert session.history == [reply]
    assert session.last_error is None

    session.max_new_tokens, session.temperature, session.top_p = 5, 0.0, 1.0
    second = session.send("second")
    assert server.received[-1] == {
        "prompt": "second",
        "generation_kwargs": {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0},
        "stream": True,
    }
    assert session.history == [reply, second]
    assert session.last_reply is second


def test_send_streams_the_pieces_into_on_text(client: LLMClient) -> None:
    pieces: list[str] = []
    reply = PromptSession(client).send("it", on_text=pieces.append)
    assert pieces == STREAM_PIECES
    assert reply is not None
    assert reply.text == "".join(pieces)


@pytest.mark.parametrize("mode", ["complete", "chat"])
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_sends_nothing(
    client: LLMClient, server: FakeServer, prompt: str, mode: str
) -> None:
    session = PromptSession(client, mode=mode)
    assert session.send(prompt) is None
    assert server.paths == [] and server.healthz_calls == 0
    assert session.history == []
    assert session.conversation == []
    assert session.last_error == "Type a prompt first."


def test_api_error_is_kept_not_raised(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client)
    good = session.send("good")
    assert session.send("bad") is None
    assert session.last_error == REFUSED
    assert len(server.received) == 2
    assert session.history == [good]  # the failure is not recorded as a reply
    assert session.last_reply is good


def test_connection_error_is_kept_not_raised(closed_port_url: str) -> None:
    session = PromptSession(LLMClient(closed_port_url))
    assert session.send("offline") is None
    assert session.last_error is not None and "Connection refused" in session.last_error
    assert session.history == []


def test_a_successful_send_clears_the_last_error(client: LLMClient) -> None:
    session = PromptSession(client)
    session.send("bad")
    assert session.last_error is not None
    session.send("good")
    assert session.last_error is None


def test_unknown_mode_sets_last_error_and_sends_nothing(
    client: LLMClient, server: FakeServer
) -> None:
    session = PromptSession(client, mode="shout")
    assert session.send("hello") is None
    assert session.last_error == "Unknown mode 'shout': use one of complete, chat."
    assert server.paths == []
    assert session.history == []
    assert session.conversation == []


def test_chat_sends_the_whole_conversation_each_turn(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client, max_new_tokens=12, temperature=0.3, top_p=0.6, mode="chat")
    first = session.send("hi")
    second = session.send("more")
    knobs = {"max_tokens": 12, "temperature": 0.3, "top_p": 0.6}
    assert server.paths == ["/v1/chat/completions"] * 2
    assert server.received == [
        chat_body([user("hi")], **knobs),
        chat_body([user("hi"), assistant(TEXT), user("more")], **knobs),
    ]
    assert session.conversation == [user("hi"), assistant(TEXT), user("more"), assistant(TEXT)]
    assert session.history == [first, second]
    assert second is not None
    assert second.text == TEXT
    assert second.completion_tokens == 5  # the usage chunk's count


def test_a_failed_chat_turn_is_not_added_to_the_conversation(
    client: LLMClient, server: FakeServer
) -> None:
    session = PromptSession(client, mode="chat")
    session.send("hi")
    assert session.send("bad") is None
    assert session.last_error == REFUSED
    assert session.send("fail-midway") is None
    assert session.last_error == MIDWAY
    assert session.conversation == [user("hi"), assistant(TEXT)]
    session.send("again")
    assert server.received[-1]["messages"] == [user("hi"), assistant(TEXT), user("again")]


def test_new_chat_clears_the_conversation(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client, mode="chat")
    session.send("hi")
    session.send("more")
    assert len(session.conversation) == 4
    session.new_chat()
    assert session.conversation == []
    session.send("fresh")
    assert server.received[-1]["messages"] == [user("fresh")]
    assert session.conversation == [user("fresh"), assistant(TEXT)]


def test_complete_mode_keeps_no_conversation(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client)
    session.send("one")
    session.send("two")
    assert server.paths == ["/generate", "/generate"]
    assert server.received[1]["prompt"] == "two"  # the prompt alone, nothing said before
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


def test_box_starts_from_the_session_settings(client: LLMClient) -> None:
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


def test_click_sends_the_widget_values(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "Tell me about Ray."
    box.max_new_tokens.value = 33
    box.temperature.value = 1.25
    box.top_p.value = 0.5
    box.send_button.click()

    assert server.received == [
        {
            "prompt": "Tell me about Ray.",
            "generation_kwargs": {"max_new_tokens": 33, "temperature": 1.25, "top_p": 0.5},
            "stream": True,
        }
    ]
    assert (session.max_new_tokens, session.temperature, session.top_p) == (33, 1.25, 0.5)
    assert session.last_reply is not None
    assert session.last_reply.text == TEXT
    assert session.last_error is None
    assert box.send_button.disabled is False
    assert box.reply.value == transcript_html([("You", "Tell me about Ray."), ("Model", TEXT)])
    # The server's count of tokens, from its last event.
    assert re.fullmatch(status_pattern(len(STREAM_PIECES)), box.status.value), box.status.value


def test_a_reply_without_a_token_count_shows_none() -> None:
    box = PromptBox(PromptSession(ScriptedClient(scripted_reply("text", None))))
    box.send_button.click()
    assert box.status.value == "[0.25 s, first text after 0.05 s]"


def test_a_chat_reply_says_how_many_prompt_tokens_its_replica_had_cached() -> None:
    reply = dataclasses.replace(scripted_reply("text", 4), cached_tokens=40)
    box = PromptBox(PromptSession(ScriptedClient(reply)))
    box.send_button.click()
    shown = "[0.25 s, first text after 0.05 s, 4 tokens, 40 prompt tokens cached]"
    assert box.status.value == shown


def test_reply_shows_the_text_while_it_streams(client: LLMClient, server: FakeServer) -> None:
    # The server sends the next piece only once the box has shown the last one.
    server.handshake = threading.Semaphore(0)
    box = PromptBox(PromptSession(client))
    box.prompt.value = "go"
    seen: list[tuple[str, bool, str]] = []

    def shown(change: dict[str, Any]) -> None:
        seen.append((change["new"], box.send_button.disabled, box.status.value))
        if "<b>Model:</b>" in change["new"]:
            server.handshake.release()

    box.reply.observe(shown, names="value")
    box.send_button.click()

    assert server.acknowledged == [True] * len(STREAM_PIECES)
    so_far = ["".join(STREAM_PIECES[:n]) for n in range(1, len(STREAM_PIECES) + 1)]
    assert [value for value, _, _ in seen] == [
        transcript_html([("You", "go")]),  # the turn, before any text
        *(transcript_html([("You", "go"), ("Model", text)]) for text in so_far),
    ]
    # Every piece showed while the button was disabled and the status said why.
    assert [(disabled, status) for _, disabled, status in seen[1:]] == [(True, WAITING)] * len(
        STREAM_PIECES
    )
    assert box.reply.value == seen[-1][0]
    assert box.send_button.disabled is False


def test_an_empty_reply_still_shows_the_turn(client: LLMClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "empty"
    box.send_button.click()
    assert box.reply.value == transcript_html([("You", "empty"), ("Model", "")])
    # No first text to time.
    assert re.fullmatch(status_pattern(0, first_text=False), box.status.value), box.status.value


def test_html_in_the_prompt_is_escaped(client: LLMClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "<script>alert(1)</script> & <b>"
    box.send_button.click()
    assert "<script>" not in box.reply.value
    assert "<b>alert" not in box.reply.value
    assert "<b>You:</b> &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in box.reply.value


def test_html_in_a_reply_is_escaped() -> None:
    reply = scripted_reply("<script>alert(1)</script> & <b>", 3)
    box = PromptBox(PromptSession(ScriptedClient(reply)))
    box.send_button.click()
    assert "<script>" not in box.reply.value
    assert "<b>alert" not in box.reply.value
    assert "<b>Model:</b> &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in box.reply.value


def test_html_in_an_error_is_escaped() -> None:
    refused = ApiError(400, {"error": {"message": "no <script> & such"}})
    box = PromptBox(PromptSession(ScriptedClient(refused)))
    box.send_button.click()
    assert box.status.value == "<b>Error:</b> HTTP 400: no &lt;script&gt; &amp; such"


def test_click_with_a_refused_request_shows_the_error(
    client: LLMClient, server: FakeServer
) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "bad"
    box.send_button.click()

    assert len(server.received) == 1
    assert session.last_reply is None
    assert session.last_error == REFUSED
    assert box.send_button.disabled is False
    assert box.status.value == f"<b>Error:</b> {REFUSED}"
    assert box.reply.value.endswith("<b>You:</b> bad</pre>")  # the turn, no reply


def test_an_error_mid_stream_keeps_the_text_so_far(client: LLMClient) -> None:
    box = PromptBox(PromptSession(client))
    box.prompt.value = "fail-midway"
    box.send_button.click()
    assert box.reply.value == transcript_html([("You", "fail-midway"), ("Model", STREAM_PIECES[0])])
    assert box.status.value == f"<b>Error:</b> {MIDWAY}"


def test_click_with_an_empty_prompt_sends_nothing(client: LLMClient, server: FakeServer) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "  "
    box.send_button.click()
    assert server.paths == []
    assert session.last_error == "Type a prompt first."
    assert box.status.value == "<b>Error:</b> Type a prompt first."
    assert box.reply.value == ""


def test_chat_in_the_box_shows_and_sends_the_conversation(
    client: LLMClient, server: FakeServer
) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.mode.value = "chat"
    box.prompt.value = "hi"
    box.send_button.click()
    box.prompt.value = "more"
    box.send_button.click()

    assert session.mode == "chat"
    assert server.paths == ["/v1/chat/completions"] * 2
    assert server.received[1]["messages"] == [user("hi"), assistant(TEXT), user("more")]
    assert box.reply.value == transcript_html(
        [("You", "hi"), ("Model", TEXT), ("You", "more"), ("Model", TEXT)]
    )


def test_new_chat_button_clears_the_conversation_and_the_reply(
    client: LLMClient, server: FakeServer
) -> None:
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
    assert server.received[-1]["messages"] == [user("fresh")]
    assert box.reply.value == transcript_html([("You", "fresh"), ("Model", TEXT)])


def test_button_is_re_enabled_when_the_client_raises() -> None:
    # Not a requests error, so the session lets it out.
    scripted = ScriptedClient(ConnectionError("server gone"))
    session = PromptSession(scripted)
    box = PromptBox(session)
    flips: list[bool] = []
    box.send_button.observe(lambda change: flips.append(change["new"]), names="disabled")
    box.send_button.click()  # ipywidgets logs a callback's exception rather than raising it
    assert scripted.calls == 1
    assert flips == [True, False]
    assert box.send_button.disabled is False
    assert box.status.value == "<b>Error:</b> ConnectionError(&#x27;server gone&#x27;)"
    assert session.last_reply is None


def test_every_label_has_room_for_its_whole_name(client: LLMClient) -> None:
    """ipywidgets' default label width cut "max_new_tokens" to "max_new…"."""
    box = PromptBox(PromptSession(client))
    labelled = [box.prompt, box.max_new_tokens, box.temperature, box.top_p]
    widths = {widget.style.description_width for widget in labelled}
    assert widths == {prompt_box.LABEL_WIDTH}
    pixels = int(prompt_box.LABEL_WIDTH.removesuffix("px"))
    assert all(len(widget.description) * 8 <= pixels for widget in labelled)


# -- PromptBox.ask: what notebook 04's cells send, whatever the box held before --------------


def ask_knobs(**changes: Any) -> dict[str, Any]:
    """The knobs notebook 04 asks with: greedy, 32 tokens, the default top_p."""
    return {"max_new_tokens": 32, "temperature": 0.0, "top_p": 0.9, **changes}


def test_ask_sets_every_widget_presses_send_and_returns_that_reply(
    client: LLMClient, server: FakeServer
) -> None:
    box = PromptBox(PromptSession(client))
    box.mode.value, box.prompt.value = "chat", "typed by hand"
    box.max_new_tokens.value, box.temperature.value, box.top_p.value = 200, 1.5, 0.3

    reply = box.ask("Name three uses of Ray Serve.", max_new_tokens=32, temperature=0.0)

    assert server.received == [
        {
            "prompt": "Name three uses of Ray Serve.",
            "generation_kwargs": ask_knobs(),
            "stream": True,
        }
    ]
    assert (box.mode.value, box.prompt.value) == ("complete", "Name three uses of Ray Serve.")
    assert (box.max_new_tokens.value, box.temperature.value, box.top_p.value) == (32, 0.0, 0.9)
    assert reply.text == TEXT and reply.generation_kwargs == ask_knobs()
    assert box.session.history == [reply]
    # The box shows it as if Send had been pressed by hand.
    assert box.reply.value == transcript_html(
        [("You", "Name three uses of Ray Serve."), ("Model", TEXT)]
    )
    assert re.fullmatch(status_pattern(len(STREAM_PIECES)), box.status.value), box.status.value


def test_a_manual_send_before_ask_does_not_change_what_ask_returns(
    client: LLMClient, server: FakeServer
) -> None:
    """Notebook 04 invites a send by hand before its cells send; its check
    read history[0], which was then the hand-sent reply, in Chat mode."""
    untouched = PromptBox(PromptSession(client)).ask("Same prompt.", temperature=0.0)
    box = PromptBox(PromptSession(client))
    box.mode.value, box.prompt.value, box.temperature.value = "chat", "by hand", 1.2
    box.send_button.click()
    manual = box.session.last_reply

    reply = box.ask("Same prompt.", temperature=0.0)

    assert manual is not None and reply is not manual
    assert box.session.history == [manual, reply]
    assert server.paths == ["/generate", "/v1/chat/completions", "/generate"]
    assert server.received[-1] == server.received[0]  # sent as from a fresh box
    assert (reply.text, reply.generation_kwargs) == (untouched.text, untouched.generation_kwargs)


def chat_cell(box: PromptBox) -> tuple[Reply, list[dict[str, str]]]:
    """Notebook 04's chat step: a new chat, two turns, the conversation kept."""
    box.new_chat_button.click()
    box.ask("My name is Ada. What is a good name for a cat?", mode="chat", **ask_knobs())
    recalled = box.ask("What is my name?", mode="chat", **ask_knobs())
    return recalled, box.session.conversation[-4:]


def test_re_running_the_chat_steps_gives_the_same_check(
    client: LLMClient, server: FakeServer
) -> None:
    box = PromptBox(PromptSession(client))
    first = chat_cell(box)
    box.prompt.value = "a turn typed by hand"
    box.send_button.click()  # still in Chat mode: one more turn in the conversation
    again = chat_cell(box)

    for recalled, chat in (first, again):
        assert [turn["role"] for turn in chat] == ["user", "assistant"] * 2
        assert chat[0]["content"] == "My name is Ada. What is a good name for a cat?"
        assert chat[3]["content"] == recalled.text == TEXT
    assert first[1] == again[1]
    # The re-run started afresh: its first turn was sent alone.
    assert server.received[-2]["messages"] == [user(first[1][0]["content"])]
    assert box.session.conversation == again[1]


@pytest.mark.parametrize(
    ("prompt", "error"),
    [("bad", REFUSED), ("  ", "Type a prompt first."), ("fail-midway", MIDWAY)],
)
def test_ask_raises_what_the_box_shows_when_a_send_fails(
    client: LLMClient, prompt: str, error: str
) -> None:
    box = PromptBox(PromptSession(client))
    with pytest.raises(RuntimeError, match=re.escape(error)):
        box.ask(prompt)
    assert box.status.value == f"<b>Error:</b> {error}"
    assert box.send_button.disabled is False


def test_ask_lets_an_unexpected_error_out() -> None:
    """Pressed by hand, ipywidgets logs it and carries on; a cell must stop."""
    box = PromptBox(PromptSession(ScriptedClient(ConnectionError("server gone"))))
    with pytest.raises(ConnectionError, match="server gone"):
        box.ask("hello")
    assert box.send_button.disabled is False


@pytest.mark.parametrize(
    "knob",
    [{"max_new_tokens": 300}, {"temperature": 2.5}, {"top_p": 0.0}],
    ids=lambda knob: next(iter(knob)),
)
def test_ask_refuses_a_knob_its_slider_cannot_hold(
    client: LLMClient, server: FakeServer, knob: dict[str, Any]
) -> None:
    """A slider clamps a value beyond its ends, so the box would send another."""
    box = PromptBox(PromptSession(client))
    with pytest.raises(ValueError, match=f"{next(iter(knob))}=.* outside the box's range"):
        box.ask("hello", **knob)
    assert server.paths == []
