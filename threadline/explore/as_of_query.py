"""The row as it was at a time (:func:`as_of`), and why it may not be known; or the whole table then.

A row is read by :mod:`~threadline.explore.as_of_row`, a whole table by
:mod:`~threadline.explore.as_of_table`; the errors are in :mod:`~threadline.explore.as_of_errors`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from datetime import datetime
from typing import Any, overload

import psycopg

from threadline.core._connection import ConnectionLike
from threadline.core._run import run, run_async
from threadline.core.errors import InvalidFilter
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore.as_of_errors import AsOfError, NoBaseline, NotYetAudited, RowDeleted
from threadline.explore.as_of_row import row_as_of_plan
from threadline.explore.as_of_table import table_as_of_plan, table_rows, table_rows_async

__all__ = ["AsOfError", "NoBaseline", "NotYetAudited", "RowDeleted", "as_of", "as_of_async"]


@overload
def as_of(
    conn: ConnectionLike, table: str, *, at: datetime, audit_schema: str = DEFAULT_SCHEMA
) -> Generator[dict[str, Any], None, None]: ...


@overload
def as_of(
    conn: ConnectionLike, table: str, pk: Any, at: datetime, *, audit_schema: str = DEFAULT_SCHEMA
) -> dict[str, Any]: ...


def as_of(
    conn: ConnectionLike,
    table: str,
    pk: Any = None,
    at: datetime | None = None,
    *,
    audit_schema: str = DEFAULT_SCHEMA,
) -> dict[str, Any] | Generator[dict[str, Any], None, None]:
    """The row as it was at ``at`` (inclusive): "what did order 7 look like when the invoice went
    out?"; without ``pk``, the whole table then: "what did orders look like on Monday?".

    A row's state is the after image of its latest captured change at or before ``at``. When it
    has none and the table has a baseline (:func:`threadline.take_baseline`) in force at ``at``,
    it is the before image of the row's next change (none if that is an insert, or if the table
    was truncated first), or else its baseline snapshot (none if the table was truncated between
    the baseline's start and ``at``). A snapshot never outranks a change captured since the table
    was last tracked (a batch may read a row before a change to it commits); a change captured
    before that (the table was untracked and tracked again) is outdated by the baseline.

    With ``pk`` (given as for :func:`threadline.history`): the row as a dict. Raises
    :class:`RowDeleted` if it had been deleted (or its table truncated) by then, and
    :class:`NotYetAudited` if its state then is not known (or, with a baseline, it did not exist).

    Without ``pk``: an iterator of the rows (dicts, in key order), streamed with flat memory; the
    table must have had a complete baseline at ``at``, else :class:`NoBaseline` is raised at
    once. The stream holds ``conn`` until it is exhausted or closed: iterate it to the end, or
    close it (``contextlib.closing``) before using ``conn`` again.

    Excluded columns are absent and masked ones hold the placeholder, as in every audit image.
    """
    if at is None:
        raise InvalidFilter("at is required")
    if pk is None:
        return table_rows(conn, table, at, audit_schema)
    return run(conn, row_as_of_plan(table, pk, at, audit_schema))


@overload
async def as_of_async(
    conn: psycopg.AsyncConnection[Any], table: str, *, at: datetime, audit_schema: str = DEFAULT_SCHEMA
) -> AsyncGenerator[dict[str, Any], None]: ...


@overload
async def as_of_async(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    pk: Any,
    at: datetime,
    *,
    audit_schema: str = DEFAULT_SCHEMA,
) -> dict[str, Any]: ...


async def as_of_async(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    pk: Any = None,
    at: datetime | None = None,
    *,
    audit_schema: str = DEFAULT_SCHEMA,
) -> dict[str, Any] | AsyncGenerator[dict[str, Any], None]:
    """Async twin of :func:`as_of`; without ``pk``, an async iterator of the table's rows."""
    if at is None:
        raise InvalidFilter("at is required")
    if pk is None:
        statement, params = await run_async(conn, table_as_of_plan(table, at, audit_schema))
        return table_rows_async(conn, statement, params)
    return await run_async(conn, row_as_of_plan(table, pk, at, audit_schema))
