"""The OpenAI-compatible request models and response shapes, without a server."""

from typing import Any

import pytest
from pydantic import ValidationError

from helpers.api.openai_responses import OpenAIFormat
from helpers.protocol import Completion, Message, TextDelta, TokenLogprob

from .request_bodies import MODEL, chat, completion, refused_field


def test_defaults_leave_the_server_to_choose() -> None:
    parsed = completion()
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.seed) == (None,) * 4
    assert parsed.stop_strings() == () and not parsed.stream and not parsed.include_usage()


def test_stop_takes_a_string_or_up_to_four() -> None:
    assert completion(stop="\n").stop_strings() == ("\n",)
    assert completion(stop=["a", "b", "c", "d"]).stop_strings() == ("a", "b", "c", "d")
    assert refused_field(completion, stop=["a", "b", "c", "d", "e"]) == "stop"
    assert refused_field(completion, stop=[""]).startswith("stop")
    assert completion(stop="x" * 256).stop_strings() == ("x" * 256,)
    assert refused_field(completion, stop=["a", "x" * 257]).startswith("stop")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": ["a"] * 5}, "prompt"),
        ({"prompt": [1, -2, 3]}, "prompt"),
        ({"prompt": [[1, 2]] * 5}, "prompt"),
    ],
)
def test_completion_fields_out_of_range_are_refused_by_name(fields: dict, param: str) -> None:
    assert refused_field(completion, **fields).startswith(param)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [(1, 2, 3)]),
        ([[1, 2], [3]], [(1, 2), (3,)]),
    ],
    ids=["text", "texts", "token ids", "lists of token ids"],
)
def test_a_completion_prompt_comes_as_text_or_token_ids(prompt: Any, expected: list) -> None:
    assert completion(prompt=prompt).prompt_list() == expected


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ([], "at least 1 item"),
        (["a", 7], "item 1: Input should be a valid string"),
        ([3, "a"], "item 1: Input should be a valid integer"),
        ([[1, "x"]], "item 0.1: Input should be a valid integer"),
        ([-1], "item 0: Input should be greater than or equal to 0"),
        ([["a"]], "item 0.0: Input should be a valid integer"),
        (["a"] * 5, "must be at most 4 prompts (MAX_PROMPTS)"),
        ({"text": "a"}, "must be a string, a list of strings, a list of token ids"),
    ],
)
def test_a_refused_prompt_gets_the_reason_for_its_own_shape(prompt: Any, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        completion(prompt=prompt)
    errors = caught.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == ("prompt",)
    assert reason in errors[0]["msg"]


def test_stream_options_need_stream() -> None:
    assert refused_field(completion, stream_options={"include_usage": True}) == "stream_options"
    assert refused_field(chat, stream_options={"include_usage": True}) == "stream_options"
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage()


def test_chat_messages_flatten_text_parts_and_map_developer_to_system() -> None:
    parsed = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
        ]
    )
    assert [m.as_message() for m in parsed.messages] == [
        Message("system", "Be brief."),
        Message("user", "Hi there"),
    ]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "tool", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
    ids=["none", "tool role", "no content", "image part"],
)
def test_bad_messages_are_refused(messages: list) -> None:
    assert refused_field(chat, messages=messages).startswith("messages")


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=10, max_completion_tokens=20).token_limit() == 20
    assert chat(max_tokens=10).token_limit() == 10
    assert refused_field(chat, max_completion_tokens=65) == "max_completion_tokens"


DONE = Completion("Hello world", prompt_tokens=5, completion_tokens=2, finish_reason="length")


def test_a_chat_response_has_openais_shape() -> None:
    body = OpenAIFormat(MODEL, chat=True).response([DONE])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_a_streamed_chat_opens_with_the_role_and_ends_with_usage() -> None:
    shape = OpenAIFormat(MODEL, chat=True, include_usage=True)
    events = [
        *shape.opening(),
        *shape.events(TextDelta(0, "Hello")),
        *shape.events(TextDelta(0, " world", DONE)),
        *shape.closing(),
    ]
    assert {e["id"] for e in events} == {shape.id}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(deltas) == "Hello world"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]] == [
        None,
        None,
        None,
        "length",
    ]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 7
    assert all(e["usage"] is None for e in events[:-1])


def test_streamed_completions_carry_each_prompts_index() -> None:
    shape = OpenAIFormat(MODEL, chat=False)
    events = [*shape.events(TextDelta(1, "b", DONE)), *shape.events(TextDelta(0, "a"))]
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in events] == [
        (1, "b"),
        (1, ""),
        (0, "a"),
    ]
    assert all("usage" not in e for e in events) and shape.closing() == []


@pytest.mark.parametrize(
    ("make", "fields", "param"),
    [
        (chat, {"top_logprobs": 2}, "top_logprobs"),
        (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (chat, {"logprobs": 1}, "logprobs"),
        (completion, {"logprobs": 6}, "logprobs"),
        (completion, {"logprobs": True}, "logprobs"),
        (completion, {"logprobs": -1}, "logprobs"),
    ],
)
def test_logprobs_out_of_range_are_refused_by_name(make, fields: dict, param: str) -> None:
    assert refused_field(make, **fields) == param


def test_logprobs_ask_for_entries_with_that_many_alternatives() -> None:
    assert chat().logprob_count() is None and completion().logprob_count() is None
    assert chat(logprobs=True).logprob_count() == 0
    assert chat(logprobs=True, top_logprobs=20).logprob_count() == 20
    assert completion(logprobs=0).logprob_count() == 0
    assert completion(logprobs=5).logprob_count() == 5


HELLO = (TokenLogprob("Hel", -0.5, (("Hel", -0.5), ("Hi", -1.5))), TokenLogprob("lo é", -0.25))


def test_chat_logprobs_have_openais_content_shape() -> None:
    done = Completion("Hello é", 3, 2, "length", logprobs=HELLO)
    choice = OpenAIFormat(MODEL, chat=True).response([done])["choices"][0]
    assert choice["logprobs"] == {
        "content": [
            {
                "token": "Hel",
                "logprob": -0.5,
                "bytes": [72, 101, 108],
                "top_logprobs": [
                    {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]},
                    {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]},
                ],
            },
            {
                "token": "lo é",
                "logprob": -0.25,
                "bytes": [108, 111, 32, 195, 169],
                "top_logprobs": [],
            },
        ]
    }


def test_completion_logprobs_have_the_legacy_lists_and_stream_their_offsets_on() -> None:
    whole = OpenAIFormat(MODEL, chat=False).response(
        [Completion("Hello é", 3, 2, "length", logprobs=HELLO)]
    )
    expected = {
        "tokens": ["Hel", "lo é"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"Hel": -0.5, "Hi": -1.5}, {}],
        "text_offset": [0, 3],
    }
    assert whole["choices"][0]["logprobs"] == expected
    stream = OpenAIFormat(MODEL, chat=False)
    first = stream.events(TextDelta(0, "Hel", logprobs=HELLO[:1]))[0]["choices"][0]["logprobs"]
    second = stream.events(TextDelta(0, "", logprobs=HELLO[1:]))[0]["choices"][0]
    assert first["text_offset"] == [0] and second["logprobs"]["text_offset"] == [3]
    assert second["text"] == "" and second["logprobs"]["tokens"] == ["lo é"]
    assert OpenAIFormat(MODEL, chat=False).response([DONE])["choices"][0]["logprobs"] is None


def test_max_tokens_0_is_only_for_echo() -> None:
    assert refused_field(completion, max_tokens=0) == "max_tokens"
    assert completion(max_tokens=0, echo=True).max_tokens == 0
    assert refused_field(completion, echo="yes") == "echo"
    assert refused_field(chat, echo=True) == "echo"


def test_usage_counts_each_prompt_once_however_many_choices() -> None:
    """Two prompts of 5 and 3 tokens, two choices each, side by side; of
    them 4 and 2 came from the prefix cache."""
    done = [
        Completion(text, prompt, out, reason, cached_tokens=cached)
        for text, prompt, out, reason, cached in [
            ("a", 5, 2, "stop", 4),
            ("b", 5, 4, "length", 4),
            ("c", 3, 1, "stop", 2),
            ("d", 3, 3, "length", 2),
        ]
    ]
    body = OpenAIFormat(MODEL, chat=False, choices=2).response(done)
    assert body["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 10,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 6},
    }
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    chat = OpenAIFormat(MODEL, chat=True, choices=3)
    assert [c["choices"][0]["index"] for c in chat.opening()] == [0, 1, 2]
    assert completion(n=8).n == 8
