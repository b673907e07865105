"""The structured-output benchmark's turns and verdict, and that its schema
outlasts ``max_tokens`` so both loads decode as many tokens per request."""

from __future__ import annotations

import json

import llguidance

from bench.servers import Outcome, taking_turns
from bench.structured_output import LOADS, STEPS, ratio_table
from helpers.engine.grammar import JSON_LAYOUT


def outcome(load: str, tokens: int, seconds: float, failed: int = 0) -> Outcome:
    return Outcome(load, 16, 48, tokens, seconds, [seconds], failed=failed)


def test_loads_take_turns_so_a_drift_weighs_on_both() -> None:
    assert list(taking_turns("free", "held", 3)) == [
        *("free", "held"),
        *("held", "free"),
        *("free", "held"),
    ]


def test_the_ratio_is_of_mean_tokens_per_s_and_is_judged_against_08() -> None:
    table = ratio_table(
        {
            "free": [outcome("free", 3072, 40), outcome("free", 3072, 38.4)],
            "held": [outcome("held", 3072, 48), outcome("held", 3008, 47, failed=1)],
        }
    )
    assert "| free | 78.4 | 64.0 | 0 |" in table
    assert "| held | 64.0 | 64.0 | 1 |" in table
    assert table.endswith("held / free = **0.82x** (target >= 0.8x: met)")
    slow = ratio_table({"free": [outcome("free", 3072, 40)], "held": [outcome("held", 3072, 60)]})
    assert slow.endswith("(target >= 0.8x: missed)")


def test_the_schema_cannot_close_within_any_benchmarked_max_tokens() -> None:
    """The shortest text the schema accepts is longer than 256 tokens of any
    vocabulary whose tokens are at most 4 bytes long on average."""
    item = '{"action": "", "minutes": 0, "optional": true}'
    shortest = (
        '{"title": "", "steps": ['
        + ", ".join([item] * STEPS["properties"]["steps"]["minItems"])
        + "]}"
    )
    assert len(shortest) > 4 * 256
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(STEPS), defaults=JSON_LAYOUT)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    assert LOADS["held"]["response_format"]["json_schema"]["schema"] is STEPS
