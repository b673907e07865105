"""Unit tests for helpers.prompt_box: the session logic and its headless widgets.

A fake client stands in for LLMClient, and token counting is patched, so no
server, model or tokenizer is involved.
"""

from __future__ import annotations

from typing import Any

import pytest

from helpers import prompt_box
from helpers.client import ApiError, Reply
from helpers.prompt_box import PromptBox, PromptSession

BAD_BODY = {"error": {"message": "max_new_tokens is too large", "param": "max_new_tokens"}}


class FakeClient:
    """Records generate() calls; a prompt of "bad" is refused with a 400."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def generate(self, prompt: str, **knobs: Any) -> Reply:
        self.calls.append((prompt, knobs))
        if prompt == "bad":
            raise ApiError(400, BAD_BODY)
        return Reply(prompt, f"reply to {prompt}", 0.25, dict(knobs))


@pytest.fixture(autouse=True)
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count words instead of loading the served model's tokenizer."""
    counted: list[str] = []

    def count_tokens(self: PromptSession, text: str) -> int:
        counted.append(text)
        return len(text.split())

    monkeypatch.setattr(prompt_box.PromptSession, "count_tokens", count_tokens)
    return counted


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


# -- PromptSession ---------------------------------------------------------------------------


def test_session_defaults(client: FakeClient) -> None:
    session = PromptSession(client)
    assert (session.max_new_tokens, session.temperature, session.top_p) == (64, 0.7, 0.9)
    assert session.history == []
    assert session.last_reply is None
    assert session.last_error is None


def test_send_passes_the_current_settings(client: FakeClient) -> None:
    session = PromptSession(client, max_new_tokens=12, temperature=0.3, top_p=0.6)
    reply = session.send("first")
    assert client.calls == [("first", {"max_new_tokens": 12, "temperature": 0.3, "top_p": 0.6})]
    assert reply is not None
    assert reply.text == "reply to first"
    assert session.last_reply is reply
    assert session.history == [reply]
    assert session.last_error is None

    session.max_new_tokens, session.temperature, session.top_p = 5, 0.0, 1.0
    second = session.send("second")
    assert client.calls[-1] == ("second", {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0})
    assert session.history == [reply, second]
    assert session.last_reply is second


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_sends_nothing(client: FakeClient, prompt: str) -> None:
    session = PromptSession(client)
    assert session.send(prompt) is None
    assert client.calls == []
    assert session.history == []
    assert session.last_error == "Type a prompt first."


def test_api_error_is_kept_not_raised(client: FakeClient) -> None:
    session = PromptSession(client)
    good = session.send("good")
    assert session.send("bad") is None
    assert session.last_error == "HTTP 400: max_new_tokens is too large"
    assert len(client.calls) == 2
    assert session.history == [good]  # the failure is not recorded as a reply
    assert session.last_reply is good


def test_a_successful_send_clears_the_last_error(client: FakeClient) -> None:
    session = PromptSession(client)
    session.send("bad")
    assert session.last_error is not None
    session.send("good")
    assert session.last_error is None


def test_local_tokenizer_fallback_counts_words(
    monkeypatch: pytest.MonkeyPatch, client: FakeClient
) -> None:
    monkeypatch.undo()  # the real count_tokens, with the tokenizer lookup replaced
    monkeypatch.setattr(prompt_box, "_local_tokenizer", lambda: None)
    assert PromptSession(client).count_tokens("one two  three\nfour") == 4


def test_count_tokens_uses_the_local_tokenizer(
    monkeypatch: pytest.MonkeyPatch, client: FakeClient
) -> None:
    monkeypatch.undo()
    seen: list[tuple[str, bool]] = []

    def tokenizer(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        seen.append((text, add_special_tokens))
        return {"input_ids": list(range(len(text)))}

    monkeypatch.setattr(prompt_box, "_local_tokenizer", lambda: tokenizer)
    assert PromptSession(client).count_tokens("abcde") == 5
    assert seen == [("abcde", False)]


# -- PromptBox (ipywidgets, headless) --------------------------------------------------------


def test_box_starts_from_the_session_settings(client: FakeClient) -> None:
    session = PromptSession(client, max_new_tokens=20, temperature=0.4, top_p=0.55)
    box = PromptBox(session)
    assert box.max_new_tokens.value == 20
    assert box.temperature.value == pytest.approx(0.4)
    assert box.top_p.value == pytest.approx(0.55)
    assert box.prompt.value  # a sample prompt is filled in
    assert box.send_button.disabled is False
    assert list(box.widget.children) == [
        box.prompt,
        box.max_new_tokens,
        box.temperature,
        box.top_p,
        box.send_button,
        box.output,
    ]


def test_click_sends_the_widget_values(
    client: FakeClient, no_tokenizer: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "Tell me about Ray."
    box.max_new_tokens.value = 33
    box.temperature.value = 1.25
    box.top_p.value = 0.5
    box.send_button.click()

    assert client.calls == [
        ("Tell me about Ray.", {"max_new_tokens": 33, "temperature": 1.25, "top_p": 0.5})
    ]
    assert (session.max_new_tokens, session.temperature, session.top_p) == (33, 1.25, 0.5)
    assert session.last_reply is not None
    assert session.last_reply.text == "reply to Tell me about Ray."
    assert session.last_error is None
    assert box.send_button.disabled is False
    assert no_tokenizer == ["reply to Tell me about Ray."]
    printed = capsys.readouterr().out  # headless, the Output widget lets prints through
    assert "reply to Tell me about Ray." in printed
    assert "[0.25 s, 6 tokens]" in printed


def test_click_with_a_refused_request_shows_the_error(
    client: FakeClient, no_tokenizer: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "bad"
    box.send_button.click()

    assert len(client.calls) == 1
    assert session.last_reply is None
    assert session.last_error == "HTTP 400: max_new_tokens is too large"
    assert box.send_button.disabled is False
    assert no_tokenizer == []  # nothing to count
    assert "Error: HTTP 400: max_new_tokens is too large" in capsys.readouterr().out


def test_click_with_an_empty_prompt_sends_nothing(
    client: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    box.prompt.value = "  "
    box.send_button.click()
    assert client.calls == []
    assert session.last_error == "Type a prompt first."
    assert "Error: Type a prompt first." in capsys.readouterr().out


def test_button_is_disabled_while_sending_and_re_enabled_after(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)
    states: list[bool] = []
    real_generate = client.generate

    def generate(prompt: str, **knobs: Any) -> Reply:
        states.append(box.send_button.disabled)
        return real_generate(prompt, **knobs)

    client.generate = generate
    box.send_button.click()
    assert states == [True]
    assert box.send_button.disabled is False


def test_button_is_re_enabled_when_the_client_raises(client: FakeClient) -> None:
    session = PromptSession(client)
    box = PromptBox(session)

    def generate(prompt: str, **knobs: Any) -> Reply:
        raise ConnectionError("server gone")

    client.generate = generate
    box.send_button.click()  # ipywidgets logs a callback's exception rather than raising it
    assert box.send_button.disabled is False
    assert session.last_reply is None
