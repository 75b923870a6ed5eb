"""The row as it was at a time (:func:`as_of`), and why it may not be known.

One statement finds the row's latest captured change at or before the time asked (through the
hash index on ``pk``), its earliest one when there is none, and a truncate of its table in
between; the row is that change's after image.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from threadline._connection import ConnectionLike
from threadline._run import Plan, Query, run, run_async
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.errors import InvalidFilter, ThreadlineError
from threadline.query import (
    CHANGE_COLUMNS,
    TRANSACTION_COLUMNS,
    _audit,
    changes_from_rows,
    check_time,
    normalize_key,
    resolve_table,
)
from threadline.records import Change, iso

__all__ = ["AsOfError", "NotYetAudited", "RowDeleted", "as_of", "as_of_async"]


class AsOfError(ThreadlineError, LookupError):
    """:func:`as_of` cannot give the row as it was at the time asked."""


class RowDeleted(AsOfError):
    """The row had been deleted (or its table truncated) by the time asked.

    ``change`` is the captured delete or truncate; ``deleted_at`` its time.
    """

    def __init__(self, message: str, *, change: Change, deleted_at: datetime) -> None:
        super().__init__(message)
        self.change = change
        self.deleted_at = deleted_at


class NotYetAudited(AsOfError):
    """No captured change of the row is at or before the time asked, so its state then is unknown.

    ``first_change`` is the row's earliest captured change, if it has any (an ``insert`` there
    means the row most likely did not exist yet).
    """

    def __init__(self, message: str, *, first_change: Change | None = None) -> None:
        super().__init__(message)
        self.first_change = first_change


def _pk_text(pk: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pk.items())


# One round trip: the row's changes (found through the pk index alone), the latest one at or before
# the time asked, the earliest one when there is none, and a truncate of the table in between.
_AS_OF_SQL = sql.SQL("""
WITH r AS MATERIALIZED (
    SELECT c.* FROM {audit}.changes c
     WHERE c.pk = %(pk)s AND {table}
), latest AS (
    SELECT * FROM r WHERE r.captured_at <= %(at)s ORDER BY r.captured_at DESC, r.id DESC LIMIT 1
), found AS (
    SELECT 'latest' AS role, latest.* FROM latest
    UNION ALL
    (SELECT 'first', r.* FROM r WHERE NOT EXISTS (SELECT FROM latest) ORDER BY r.captured_at, r.id LIMIT 1)
    UNION ALL
    (SELECT 'truncate', c.* FROM {audit}.changes c, latest l
      WHERE l.op <> 'delete' AND c.op = 'truncate'
        AND {table}
        AND c.captured_at >= l.captured_at AND c.captured_at <= %(at)s
        AND (c.captured_at, c.id) > (l.captured_at, l.id)
      ORDER BY c.captured_at, c.id LIMIT 1)
)
SELECT c.role, {changes}, {transactions}
  FROM found c LEFT JOIN {audit}.transactions t ON t.id = c.transaction_id
""")


def _as_of_plan(table: str, pk: Any, at: datetime, audit_schema: str) -> Plan[dict[str, Any]]:
    audit = _audit(audit_schema)
    if at is None:
        raise InvalidFilter("at is required")
    moment = check_time("at", at)
    ref = yield from resolve_table(table, audit_schema)
    key = normalize_key(ref, pk)
    row_of = f"{ref} ({_pk_text(key)})"
    params: dict[str, Any] = {"pk": Jsonb(key), "at": moment}
    rows = yield Query(
        _AS_OF_SQL.format(
            audit=audit, changes=CHANGE_COLUMNS, transactions=TRANSACTION_COLUMNS, table=ref.condition(params)
        ),
        params,
    )
    found = {row["role"]: change for row, change in zip(rows, changes_from_rows(rows), strict=True)}
    latest = found.get("latest")
    if latest is None:
        first = found.get("first")
        if first is None:
            detail = "it has no captured change at all"
        elif first.op == "insert":
            detail = f"it was inserted at {iso(first.captured_at)}, so it most likely did not exist yet"
        else:
            detail = f"its earliest captured change is an {first.op} at {iso(first.captured_at)}"
        raise NotYetAudited(
            f"{row_of} has no captured change at or before {iso(moment)}: {detail}", first_change=first
        )
    if latest.op == "delete":
        raise RowDeleted(
            f"{row_of} was deleted at {iso(latest.captured_at)}", change=latest, deleted_at=latest.captured_at
        )
    truncate = found.get("truncate")
    if truncate is not None:
        raise RowDeleted(
            f"{row_of} was removed when {ref} was truncated at {iso(truncate.captured_at)}",
            change=truncate,
            deleted_at=truncate.captured_at,
        )
    assert latest.after is not None
    return dict(latest.after)


def as_of(
    conn: ConnectionLike, table: str, pk: Any, at: datetime, *, audit_schema: str = DEFAULT_SCHEMA
) -> dict[str, Any]:
    """The row as it was at ``at`` (inclusive), from the image of its latest captured change:
    "what did order 7 look like when the invoice went out?".

    Raises :class:`RowDeleted` if it had been deleted (or its table truncated)
    by then, and :class:`NotYetAudited` if no captured change of the row is at
    or before ``at``. Excluded columns are absent and masked ones hold the placeholder, as in
    every audit image. ``pk`` is given as for :func:`threadline.history`.
    """
    return run(conn, _as_of_plan(table, pk, at, audit_schema))


async def as_of_async(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    pk: Any,
    at: datetime,
    *,
    audit_schema: str = DEFAULT_SCHEMA,
) -> dict[str, Any]:
    """Async twin of :func:`as_of`."""
    return await run_async(conn, _as_of_plan(table, pk, at, audit_schema))
