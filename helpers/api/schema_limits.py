"""What a client's JSON schema may ask of the grammar a replica builds for
it, beyond its size: the ``multipleOf`` divisors.

The grammar library builds an automaton with a state per remainder of a
divisor, outside its own budgets: a schema of forty bytes with a divisor of
seven significant digits keeps a replica compiling for seconds, and a larger
one runs it out of memory. Divisors that can meet at one value (in an
``allOf``, ``anyOf`` or ``oneOf``, or through a ``$ref``) multiply their
remainders, since the library's automaton for either-or tracks both at
once; those of separate values (properties, array items) only add up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

MAX_REMAINDERS_PER_VALUE = 10_000
"""Most remainders the divisors that can meet at one value may ask for together."""
MAX_REMAINDERS = 100_000
"""Most remainders all of a schema's divisors may ask for, added up."""


def check_multiple_of(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a ``multipleOf`` that is not a number above
    0, or divisors whose grammar would take a replica too long to build."""
    objects = list(objects_in(schema))
    divisors = [node["multipleOf"] for node in objects if _is_number(node.get("multipleOf"))]
    for divisor in divisors:
        if not (math.isfinite(divisor) and divisor > 0):
            raise ValueError(f"multipleOf must be a finite number above 0, not {divisor!r}")
    if (total := sum(map(remainders, divisors))) > MAX_REMAINDERS:
        raise ValueError(
            f"multipleOf: the schema's divisors ask a grammar to track {total} remainders in "
            f"all (their significant digits read as integers, added up): at most {MAX_REMAINDERS}"
        )
    held_together = _HeldTogether(schema)
    try:
        too_many = any(held_together(node) > MAX_REMAINDERS_PER_VALUE for node in objects)
    except RecursionError:  # a $ref chain hundreds long, within MAX_SCHEMA_BYTES
        raise ValueError("$ref: the schema's references chain too deep to check") from None
    if too_many:
        raise ValueError(
            "multipleOf: the divisors holding one value ask a grammar to track more than "
            f"{MAX_REMAINDERS_PER_VALUE} remainders (their significant digits read as "
            "integers, multiplied over allOf, anyOf, oneOf and $ref)"
        )


def remainders(number: float) -> int:
    """``number``'s significant digits as an integer, the remainders a
    grammar holding a value to its multiples tracks: 100000 and 0.0001 give
    1, 0.25 gives 25, 12345.6 gives 123456."""
    digits = Decimal(str(number)).normalize().as_tuple().digits
    return int("".join(map(str, digits)) or "0") or 1


class _HeldTogether:
    """The remainders of the divisors that can meet at one value at a
    schema object: its own, and those of its ``allOf``, ``anyOf`` and
    ``oneOf`` members and of the schema its ``$ref`` names.

    Each object is worked out once: ``$ref`` lets a schema of a few hundred
    bytes name one object along 2**n paths. A product stops just past the
    limit, and an object reached again while it is worked out (a ``$ref``
    loop) adds nothing more."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._known: dict[int, int] = {}

    def __call__(self, node: dict[str, Any]) -> int:
        if (known := self._known.get(id(node))) is not None:
            return known
        self._known[id(node)] = 1  # while in progress
        own = node.get("multipleOf")
        product = remainders(own) if _is_number(own) else 1
        members = [node.get(combined) for combined in ("allOf", "anyOf", "oneOf")]
        ref = node.get("$ref")
        if isinstance(ref, str):
            members.append([_resolve(self._root, ref)])
        for member in (m for listed in members if isinstance(listed, list) for m in listed):
            if isinstance(member, dict):
                product = min(product * self(member), MAX_REMAINDERS_PER_VALUE + 1)
        self._known[id(node)] = product
        return product


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The part of ``root`` a local ``$ref`` (``#/$defs/name``) names, or None."""
    if not ref.startswith("#"):
        return None
    found: Any = root
    for part in filter(None, ref[1:].split("/")):
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(found, dict):
            found = found.get(key)
        elif isinstance(found, list) and key.isdigit() and int(key) < len(found):
            found = found[int(key)]
        else:
            return None
    return found


def objects_in(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object in ``schema`` (any nesting of dicts and lists), itself included."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from objects_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from objects_in(item)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
