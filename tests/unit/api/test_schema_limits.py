"""What a client's JSON schema may ask of a grammar's ``multipleOf``
(helpers/api/schema_limits.py): divisors that can meet at one value
multiply their remainders, those of separate values add up."""

from __future__ import annotations

from typing import Any

import pytest

from helpers.api.schema_limits import check_multiple_of, remainders


def times(divisor: float) -> dict[str, Any]:
    return {"type": "number", "multipleOf": divisor}


def properties(*held: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": schema for i, schema in enumerate(held)}}


@pytest.mark.parametrize(
    "schema",
    [
        properties(*[times(5)] * 6),  # five-minute steps, six of them
        properties(times(15), times(15), times(45)),
        properties(*[times(0.25)] * 3) | {"$defs": {"cents": times(0.01)}},
        properties(*[times(9999)] * 10),
        {"$defs": {"a": {"$ref": "#/$defs/a", "multipleOf": 7}}, "$ref": "#/$defs/a"},
    ],
    ids=["six fives", "15, 15 and 45", "quarters and cents", "ten of 9999", "a $ref loop"],
)
def test_divisors_of_separate_values_are_accepted(schema: dict[str, Any]) -> None:
    check_multiple_of(schema)


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (times(10007), "one value"),
        ({"allOf": [times(9973), times(9967)]}, "one value"),
        ({"anyOf": [times(9973), times(9967)]}, "one value"),  # either-or tracks both
        ({"multipleOf": 9973, "allOf": [{"allOf": [times(3)]}]}, "one value"),
        ({"$defs": {"a": times(9973)}, "$ref": "#/$defs/a", "multipleOf": 9967}, "one value"),
        (properties(*[times(9999)] * 11), "in all"),
        (times(float("inf")), "finite number above 0"),
        (times(0), "finite number above 0"),
        (times(-5), "finite number above 0"),
    ],
    ids=[
        "10007",
        "allOf",
        "anyOf",
        "nested allOf",
        "$ref",
        "eleven of 9999",
        "inf",
        "0",
        "negative",
    ],
)
def test_divisors_a_grammar_would_take_too_long_on_are_refused(
    schema: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        check_multiple_of(schema)


def test_remainders_are_the_significant_digits() -> None:
    assert [remainders(n) for n in (100000, 0.0001, 0.25, 12345.6, 1.5e-7, 7)] == [
        1,
        1,
        25,
        123456,
        15,
        7,
    ]


def test_a_ref_named_along_many_paths_is_worked_out_once() -> None:
    """Each level names the next twice: 2**60 paths to the last, in 4 KB.
    Followed path by path, the check itself would never end."""
    levels = 60
    defs: dict[str, Any] = {
        f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(levels)
    }
    defs[f"d{levels}"] = {"type": "integer", "multipleOf": 1}
    check_multiple_of({"$defs": defs, "$ref": "#/$defs/d0"})
    defs[f"d{levels}"]["multipleOf"] = 3  # 3 ** 2 ** 60 at the top, as counted
    with pytest.raises(ValueError, match="one value"):
        check_multiple_of({"$defs": defs, "$ref": "#/$defs/d0"})


def test_a_ref_chain_too_deep_to_follow_is_refused_not_crashed_on() -> None:
    links = 2000
    defs: dict[str, Any] = {f"{i}": {"$ref": f"#/$defs/{i + 1}"} for i in range(links)}
    defs[f"{links}"] = times(3)
    with pytest.raises(ValueError, match="chain too deep"):
        check_multiple_of({"$defs": defs, "$ref": "#/$defs/0"})
