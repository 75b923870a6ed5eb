"""One implementation, two drivers: query logic written once as a generator that yields SQL.

A *plan* is a generator that yields :class:`Query` objects and receives each one's rows (as
dicts); its return value is the result. :func:`run` drives it on a :class:`psycopg.Connection`,
:func:`run_async` on a :class:`psycopg.AsyncConnection`, so the synchronous and asynchronous
public functions share every line of SQL and validation.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from threadline.core._connection import ConnectionLike, json_adapters, native

T = TypeVar("T")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Query:
    """A statement and its bound parameters."""

    statement: sql.SQL | sql.Composed
    params: Mapping[str, Any]
    cache_key: str | None = None
    """When set, the rows are remembered per connection under this key and the statement runs
    once per connection (for facts that only change with the audit schema's layout)."""


Plan = Generator[Query, Rows, T]

_remembered: weakref.WeakKeyDictionary[Any, dict[str, Rows]] = weakref.WeakKeyDictionary()


def forget(conn: Any) -> None:
    """Drop what :class:`Query.cache_key` remembered for ``conn`` (after its schema changed)."""
    try:
        raw = native(conn)[0] if not isinstance(conn, psycopg.AsyncConnection) else conn
    except Exception:
        return
    _remembered.pop(raw, None)


def _recall(conn: Any, query: Query) -> Rows | None:
    if query.cache_key is None:
        return None
    return _remembered.get(conn, {}).get(query.cache_key)


def _remember(conn: Any, query: Query, rows: Rows) -> None:
    if query.cache_key is not None:
        _remembered.setdefault(conn, {})[query.cache_key] = rows


def run(conn: ConnectionLike, plan: Plan[T]) -> T:
    """Drive ``plan`` on a synchronous connection (psycopg's, or Django's)."""
    raw, from_django = native(conn)
    try:
        query = next(plan)
        while True:
            rows = _recall(raw, query)
            if rows is None:
                with raw.cursor(row_factory=dict_row) as cur:
                    if from_django:
                        json_adapters(cur.adapters)
                    cur.execute(query.statement, query.params)
                    rows = cur.fetchall() if cur.description is not None else []
                _remember(raw, query, rows)
            query = plan.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(conn: psycopg.AsyncConnection[Any], plan: Plan[T]) -> T:
    """Drive ``plan`` on an asynchronous connection."""
    try:
        query = next(plan)
        while True:
            rows = _recall(conn, query)
            if rows is None:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(query.statement, query.params)
                    rows = await cur.fetchall() if cur.description is not None else []
                _remember(conn, query, rows)
            query = plan.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
