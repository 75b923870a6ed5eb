"""Captured text made safe to show, and encodable.

Captured values are whatever the application wrote. Shown raw on a terminal, a control character
acts instead of showing: a carriage return or an ANSI escape (``\\x1b[2K``, erase the line) in a
value could hide or forge a line an auditor reads, and a bidirectional override (U+202E) reorders
what follows it. What shows captured text passes it through :func:`printable`, which writes each
such character as its JSON escape (``\\u001b``); :func:`one_line` also escapes line breaks and
tabs, for a value shown inside one line.

A JSON value captured from a ``json`` column may also hold an escape of half a surrogate pair
(``"\\ud83d"``, as JavaScript writes a string cut inside an emoji), which Python decodes to a lone
surrogate: UTF-8 cannot encode it, so writing it out would fail. Exports, which keep every other
character as recorded, pass text through :func:`encodable`, which escapes lone surrogates only.
A CSV export is opened in spreadsheets, which run a cell that starts with ``=``, ``+``, ``-`` or
``@`` as a formula (``=HYPERLINK(...)`` in a correlation id taken from a request header):
:func:`spreadsheet_cell` writes such a text cell, and one that starts with ``'``, after a ``'``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["encodable", "one_line", "printable", "printable_value", "spreadsheet_cell"]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls but line feed and tab, DEL and C1, the bidirectional marks, embeddings, overrides
# and isolates, the line and paragraph separators, and lone surrogates
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_UNSAFE_IN_A_LINE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def encodable(text: str) -> str:
    """``text`` with each lone surrogate written as its JSON escape (``\\ud83d``)."""
    return _LONE_SURROGATE.sub(_escape, text)


def printable(text: str) -> str:
    """``text`` with every character that would act on a terminal rather than show (controls
    other than line feed and tab, bidirectional controls, line separators) and each lone surrogate
    written as its JSON escape (``\\u001b``)."""
    if text.isprintable():  # the common case, without a regex
        return text
    return _UNSAFE.sub(_escape, text)


def one_line(text: str) -> str:
    """:func:`printable`, with line feeds and tabs escaped too (``\\n``, ``\\t``)."""
    if text.isprintable():
        return text
    return _UNSAFE_IN_A_LINE.sub(_one_line_escape, text)


def _one_line_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    return _escape(match)


def printable_value(value: Any) -> Any:
    """``value`` (a decoded JSON value) with :func:`printable` applied to every string in it,
    keys included."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k): printable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_value(v) for v in value]
    return value


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_cell(value: Any) -> Any:
    """``value`` for a CSV cell: text that a spreadsheet would run as a formula gets a leading
    ``'`` (as does text starting with ``'``, so one ``'`` removed gives the text back); other
    values as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
