"""TextStream with the embedded model's real tokenizer: no model, no Ray."""

from collections.abc import Iterator

import pytest

from helpers.config import EMBEDDED_MODEL_ID, ServeConfig
from helpers.engine.engine import load_tokenizer
from helpers.engine.text_stream import REPLACEMENT_CHARACTER, TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_MODEL_ID, ServeConfig.from_env({}).model_cache_dir)


def feed(stream: TextStream, tokens: list[int]) -> Iterator[str]:
    for token in tokens:
        yield stream.append(token)
        if stream.stopped:
            return
    yield stream.finish()


def test_deltas_add_up_to_the_decoded_text(tokenizer) -> None:
    text = "Naïve café, 日本語 and 😀 emoji:\n  indented  spaces."
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = list(feed(stream, tokens))
    assert "".join(deltas) == stream.text == tokenizer.decode(tokens)
    assert not any(REPLACEMENT_CHARACTER in d for d in deltas)
    # The emoji spans several byte-level tokens, so some steps release nothing.
    assert len(tokens) > len(text.split()) and "" in deltas


def test_text_ends_before_a_stop_string_that_spans_tokens(tokenizer) -> None:
    text = "one two three four five"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=("three fo",))
    deltas = list(feed(stream, tokens))
    assert stream.stopped
    assert stream.text == "one two "
    assert "".join(deltas) == "one two "
    assert not any("thr" in d for d in deltas)


def test_the_earliest_stop_string_wins(tokenizer) -> None:
    tokens = tokenizer("a, b. c; d", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=(";", "."))
    list(feed(stream, tokens))
    assert stream.text == "a, b"


def test_a_held_back_prefix_is_released_when_no_stop_follows(tokenizer) -> None:
    tokens = tokenizer("the end is near", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=(" nearby",))
    deltas = [stream.append(t) for t in tokens]
    assert "".join(deltas) == "the end is"  # " near" could still become " nearby"
    assert stream.finish() == " near"
    assert not stream.stopped


def test_an_empty_stop_string_is_ignored(tokenizer) -> None:
    tokens = tokenizer("hello", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=("",))
    assert "".join(feed(stream, tokens)) == "hello"


def test_without_readers_or_stops_the_text_is_decoded_once_at_the_end(tokenizer) -> None:
    tokens = tokenizer("Naïve café, 日本語 😀", add_special_tokens=False)["input_ids"]
    lazy, eager = TextStream(tokenizer, incremental=False), TextStream(tokenizer)
    assert [lazy.append(t) for t in tokens] == [""] * len(tokens)
    assert lazy.text == ""
    assert lazy.finish() == "".join(feed(eager, tokens)) == tokenizer.decode(tokens)
    assert TextStream(tokenizer, stop=(".",), incremental=False).incremental  # stops need it
