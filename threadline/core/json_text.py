"""JSON text that :func:`json.loads` cannot take whole, decoded as far as it goes.

A captured image holds a ``json`` column's value as written, and Python's decoder refuses two
things PostgreSQL stores: an integer of more digits than Python converts
(``sys.get_int_max_str_digits()``, 4,300 by default; a ``numeric`` column may hold 131,072), and
nesting deeper than its recursion limit (about 1,000 levels; PostgreSQL's ``json`` takes about
14,500). :func:`loads_whole` decodes such a text all the same: a long integer as a ``Decimal``,
and a value nested too deep as its JSON text (a string), the object around it decoded as usual.
:func:`dumps_exact` writes such values back: a ``Decimal`` as the number it is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

__all__ = ["dumps_exact", "exact_int", "loads_whole"]


def exact_int(text: str) -> int | Decimal:
    """An integer literal as an ``int``; as a ``Decimal`` beyond the digits Python converts."""
    try:
        return int(text)
    except ValueError:
        return Decimal(text)


def loads_whole(text: str, parse_float: Callable[[str], Any] | None = None) -> Any:
    """``json.loads(text)`` for the texts it refuses (see the module): long integers as
    ``Decimal``; within a top-level object or array, each value nested too deep as its text."""
    try:
        return json.loads(text, parse_float=parse_float, parse_int=exact_int)
    except RecursionError:
        pass
    stripped = text.strip()
    if stripped[:1] not in ("{", "["):
        return stripped  # a scalar cannot be nested
    is_object = stripped[0] == "{"
    items = [(stripped[a:b], stripped[c:d]) for a, b, c, d in _top_level_spans(stripped)]
    values = [_value_or_text(value, parse_float) for _, value in items]
    if is_object:
        return {json.loads(key): value for (key, _), value in zip(items, values, strict=True)}
    return values


def _value_or_text(text: str, parse_float: Callable[[str], Any] | None) -> Any:
    try:
        return json.loads(text, parse_float=parse_float, parse_int=exact_int)
    except RecursionError:
        return text


def _top_level_spans(text: str) -> list[tuple[int, int, int, int]]:
    """The spans of each key and value directly inside the object or array ``text`` (a key's span
    empty in an array), found without recursion."""
    spans: list[tuple[int, int, int, int]] = []
    depth, in_string, escaped = 0, False, False
    key = (0, 0)
    start = 1
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0 and text[start:i].strip():
                spans.append((*key, *_trimmed(text, start, i)))
        elif depth == 1 and ch == ":":
            key = _trimmed(text, start, i)
            start = i + 1
        elif depth == 1 and ch == ",":
            spans.append((*key, *_trimmed(text, start, i)))
            start = i + 1
    return spans


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def dumps_exact(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, **kwargs)`` that writes each ``Decimal`` as a JSON number with all its
    digits (``json`` alone refuses it, and ``default=str`` would make it a string)."""
    numbers: dict[str, str] = {}
    nonce = uuid.uuid4().hex

    def swapped(item: Any) -> Any:
        if isinstance(item, Decimal) and item.is_finite():
            token = f"{nonce}:{len(numbers)}"
            numbers[json.dumps(token)] = str(item)
            return token
        if isinstance(item, dict):
            return {k: swapped(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [swapped(v) for v in item]
        return item

    text = json.dumps(swapped(value), **kwargs)
    for quoted, number in numbers.items():
        text = text.replace(quoted, number, 1)
    return text
