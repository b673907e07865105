"""Which tokens end a completion, from what the model and tokenizer declare."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers.engine.engine import _eos_token_ids


@pytest.mark.parametrize(
    ("model_says", "tokenizer_says", "ends"),
    [
        ([2, 7], 9, {2, 7}),
        (2, 9, {2}),
        (None, 9, {9}),
        (None, None, set()),
    ],
    ids=["the model's list", "the model's one", "the tokenizer's", "none"],
)
def test_the_model_names_the_end_tokens_else_the_tokenizer_else_none(
    model_says: int | list[int] | None, tokenizer_says: int | None, ends: set[int]
) -> None:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=model_says))
    assert _eos_token_ids(model, SimpleNamespace(eos_token_id=tokenizer_says)) == ends
