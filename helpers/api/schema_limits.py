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
    divisors = [node["multipleOf"] for node in _nodes(schema) if _is_number(node.get("multipleOf"))]
    for divisor in divisors:
        if not (math.isfinite(divisor) and divisor > 0):
            raise ValueError(f"multipleOf must be a finite number above 0, not {divisor!r}")
    if (total := sum(map(remainders, divisors))) > MAX_REMAINDERS:
        raise ValueError(
            f"multipleOf: the schema's divisors ask a grammar to track {total} remainders in "
            f"all (their significant digits read as integers, added up): at most {MAX_REMAINDERS}"
        )
    for node in _nodes(schema):
        if (held := _held_together(node, schema, frozenset())) > MAX_REMAINDERS_PER_VALUE:
            raise ValueError(
                f"multipleOf: the divisors holding one value ask a grammar to track {held} "
                "remainders (their significant digits read as integers, multiplied over "
                f"allOf, anyOf, oneOf and $ref): at most {MAX_REMAINDERS_PER_VALUE}"
            )


def remainders(number: float) -> int:
    """``number``'s significant digits as an integer, the remainders a
    grammar holding a value to its multiples tracks: 100000 and 0.0001 give
    1, 0.25 gives 25, 12345.6 gives 123456."""
    digits = Decimal(str(number)).normalize().as_tuple().digits
    return int("".join(map(str, digits)) or "0") or 1


def _held_together(node: dict[str, Any], root: dict[str, Any], followed: frozenset[str]) -> int:
    """The remainders of the divisors that can meet at one value at
    ``node``: its own, and those of its ``allOf``, ``anyOf`` and ``oneOf``
    members and of the schema its ``$ref`` names."""
    own = node.get("multipleOf")
    product = remainders(own) if _is_number(own) and math.isfinite(own) and own > 0 else 1
    for combined in ("allOf", "anyOf", "oneOf"):
        members = node.get(combined)
        for member in members if isinstance(members, list) else ():
            if isinstance(member, dict):
                product *= _held_together(member, root, followed)
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in followed:
        target = _resolve(root, ref)
        if isinstance(target, dict):
            product *= _held_together(target, root, followed | {ref})
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


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object in ``schema``, itself included."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _nodes(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _nodes(item)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
