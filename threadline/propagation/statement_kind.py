"""Which statements an autocommit connection must send without the context.

In autocommit mode the context travels with a statement as ``SET LOCAL`` in the same simple query
(or ``set_config`` in the same pipeline), which PostgreSQL runs as one implicit transaction block.
Some statements refuse to run in a transaction block (``VACUUM``, ``CREATE INDEX CONCURRENTLY``,
``CREATE DATABASE``, ...), and a procedure that commits refuses to be called in one. None of the
first kind writes a row a capture trigger sees, so they are sent alone; a ``CALL`` is sent with the
context, and alone again only when PostgreSQL refused the procedure's own ``COMMIT``.
"""

from __future__ import annotations

import re
from typing import Any

from psycopg import sql

__all__ = ["is_call", "runs_outside_transaction", "statement_text"]

_WORD = re.compile(r"[A-Za-z_]+")
_CONCURRENTLY = re.compile(r"\bconcurrently\b", re.IGNORECASE)

# First words of statements that write no audited row and that PostgreSQL may refuse inside a
# transaction block (or that end or open one themselves).
_ALONE_FIRST = frozenset(
    {
        "VACUUM", "CLUSTER", "REINDEX", "DISCARD", "CHECKPOINT", "BEGIN", "START", "COMMIT", "END",
        "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE",
    }
)  # fmt: skip
# ... and of CREATE / DROP / ALTER followed by one of these
_ALONE_OBJECTS = frozenset({"DATABASE", "TABLESPACE", "SUBSCRIPTION", "SYSTEM"})
_DDL = frozenset({"CREATE", "DROP", "ALTER"})


def statement_text(query: Any, context: Any) -> str | None:
    """The SQL text of ``query`` as a cursor would send it (``None`` for what it cannot read)."""
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    if isinstance(query, sql.Composable):
        return query.as_string(context)
    return None


def leading_words(text: str, limit: int = 2) -> list[str]:
    """The first ``limit`` keywords of ``text``, upper-cased, past blanks and comments."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n and len(words) < limit:
        if text[i].isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            i = _block_comment_end(text, i)
        else:
            match = _WORD.match(text, i)
            if match is None:
                break
            words.append(match.group().upper())
            i = match.end()
    return words


def _block_comment_end(text: str, start: int) -> int:
    # PostgreSQL's block comments nest
    depth, i, n = 0, start, len(text)
    while i < n:
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def runs_outside_transaction(text: str) -> bool:
    """True for a statement to send without the context: one that PostgreSQL may refuse inside a
    transaction block and that writes no row a capture trigger sees."""
    words = leading_words(text)
    if not words:
        return False
    first = words[0]
    if first in _ALONE_FIRST:
        return True
    if first in _DDL:
        return (len(words) > 1 and words[1] in _ALONE_OBJECTS) or _CONCURRENTLY.search(text) is not None
    return False


def is_call(text: str) -> bool:
    """True for a ``CALL`` of a procedure."""
    return leading_words(text, 1) == ["CALL"]
