"""How a prompt that ``echo`` repeats wraps its completion (helpers/serve/model_server.py)."""

from __future__ import annotations

from helpers.protocol import Completion, TextDelta, TokenLogprob
from helpers.serve.model_server import Echo

PROMPT = (TokenLogprob("Once", None), TokenLogprob(" upon", -2.0, ((" upon", -2.0),)))
DONE = Completion(
    " a time", 2, 2, "length", (TokenLogprob(" a", -0.5), TokenLogprob(" time", -0.1))
)


def test_the_completion_begins_with_the_prompt_and_its_logprobs() -> None:
    echo = Echo("Once upon", 2, PROMPT)
    assert echo.opening(3) == TextDelta(3, "Once upon", logprobs=PROMPT)
    wrapped = echo.around(TextDelta(3, "", completion=DONE)).completion
    assert wrapped is not None and wrapped.text == "Once upon a time"
    assert wrapped.logprobs == PROMPT + DONE.logprobs
    assert (wrapped.prompt_tokens, wrapped.completion_tokens) == (2, 2)
    assert echo.around(TextDelta(3, " a")) == TextDelta(3, " a"), "text on its way is left alone"


def test_without_logprobs_only_the_text_is_echoed() -> None:
    plain = Completion(" a time", 2, 2, "length")
    wrapped = Echo("Once upon", 2, None).around(TextDelta(0, "", completion=plain)).completion
    assert wrapped == Completion("Once upon a time", 2, 2, "length")


def test_max_tokens_0_answers_with_the_prompt_alone() -> None:
    streamed = Echo("Once upon", 2, PROMPT).nothing_more(1, streamed=True)
    assert (streamed.index, streamed.text, streamed.logprobs) == (1, "Once upon", PROMPT)
    assert streamed.completion == Completion("Once upon", 2, 0, "length", PROMPT)
    whole = Echo("Once upon", 2, None).nothing_more(0, streamed=False)
    assert whole.text == "" and whole.completion == Completion("Once upon", 2, 0, "length")
