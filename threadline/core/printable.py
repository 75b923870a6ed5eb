"""Text every encoder takes, for display.

A JSON value captured from a ``json`` column may hold an escape of half a surrogate pair
(``"\\ud83d"``, as JavaScript writes a string cut inside an emoji), which Python decodes to a lone
surrogate: UTF-8 cannot encode it, so printing it or sending it in a web page would fail. The
readers return values as recorded; what shows them passes them through :func:`printable` first.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["printable", "printable_value"]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with each lone surrogate written as its JSON escape (``\\ud83d``)."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


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
