"""What an erasure leaves in an image in place of a value: the tombstone or a pseudonym."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TOMBSTONE", "is_erased"]

TOMBSTONE = "[erased]"
PSEUDONYM = re.compile(r"^pseudo:[0-9a-f]{32}$")
# the same test on a json value's text, for SQL (a string of the tombstone or a pseudonym)
ERASED_JSON_TEXT = r'^"(\[erased\]|pseudo:[0-9a-f]{32})"$'


def is_erased(value: Any) -> bool:
    """Whether ``value`` is what an erasure put in place of a recorded value."""
    return isinstance(value, str) and (value == TOMBSTONE or PSEUDONYM.match(value) is not None)
