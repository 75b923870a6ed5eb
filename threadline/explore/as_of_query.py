"""The row as it was at a time (:func:`as_of`), and why it may not be known; or the whole table then.

One statement finds the row's latest captured change at or before the time asked (through the
hash index on ``pk``), the table's baseline in force then, and when there is no such change the
row's earliest one after it and its baseline snapshot, and the truncates of the table around
that time; the row is the after image of the latest change, or else what the next change, the
baseline and the truncates tell. The whole table is one statement over the table's changes that
applies the same rules to every key, streamed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping
from datetime import datetime
from typing import Any, overload

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from threadline.core._connection import ConnectionLike, json_adapters, native
from threadline.core._run import Plan, Query, run, run_async
from threadline.core.errors import InvalidFilter, ThreadlineError
from threadline.core.records import Change, iso
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore.arguments import audit_identifier, check_time
from threadline.explore.selection import (
    CHANGE_COLUMNS,
    TRANSACTION_COLUMNS,
    changes_from_rows,
    partitioned_plan,
    transaction_join,
)
from threadline.explore.tables import normalize_key, resolve_table

__all__ = ["AsOfError", "NoBaseline", "NotYetAudited", "RowDeleted", "as_of", "as_of_async"]


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


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _pk_text(pk: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pk.items())


# One round trip: the row's changes (found through the pk index alone), the table's baseline in
# force at the time asked, the row's latest change at or before that time, and when there is none
# its earliest one after it (its before image is the row then) and its snapshot in that baseline;
# and a truncate of the table in between. Snapshots never outrank a change captured while the table
# was tracked as it is now: a baseline batch may read a row while a change to it is still
# uncommitted, so its snapshot can be older than its time. A change from before that (the table was
# untracked in between, so its rows may have changed unseen) is outdated by the baseline.
_AS_OF_SQL = sql.SQL("""
WITH r AS MATERIALIZED (
    SELECT c.* FROM {audit}.changes c
     WHERE c.pk = %(pk)s AND {table}
), inforce AS (
    SELECT c.transaction_id, c.started_at, c.tracked_since, c.finished_at IS NOT NULL AS finished
      FROM (SELECT x.*, x.started_at AS captured_at FROM {audit}.baselines x) c
     WHERE {baseline_table} AND c.started_at <= %(at)s AND (c.ended_at IS NULL OR c.ended_at > %(at)s)
     ORDER BY c.started_at DESC LIMIT 1
), latest AS (
    SELECT * FROM r WHERE r.op <> 'snapshot' AND r.captured_at <= %(at)s
       AND NOT EXISTS (SELECT FROM inforce i WHERE r.captured_at < i.tracked_since)
     ORDER BY r.captured_at DESC, r.id DESC LIMIT 1
), b AS (
    SELECT i.transaction_id, i.started_at FROM inforce i
     WHERE i.transaction_id IN (SELECT r.transaction_id FROM r WHERE r.op = 'snapshot')
), found AS (
    SELECT 'latest' AS role, latest.* FROM latest
    UNION ALL
    (SELECT 'first', r.* FROM r WHERE r.op <> 'snapshot' AND r.captured_at > %(at)s
        AND NOT EXISTS (SELECT FROM latest)
      ORDER BY r.captured_at, r.id LIMIT 1)
    UNION ALL
    (SELECT 'snapshot', r.* FROM r JOIN b ON b.transaction_id = r.transaction_id
      WHERE NOT EXISTS (SELECT FROM latest) ORDER BY r.id DESC LIMIT 1)
    UNION ALL
    (SELECT 'next truncate', c.* FROM {audit}.changes c
      WHERE c.op = 'truncate' AND {table} AND c.captured_at > %(at)s AND NOT EXISTS (SELECT FROM latest)
      ORDER BY c.captured_at, c.id LIMIT 1)
    UNION ALL
    (SELECT 'truncate', c.* FROM {audit}.changes c,
            (SELECT l.captured_at, l.id FROM latest l WHERE l.op <> 'delete'
             UNION ALL
             SELECT b.started_at, 0 FROM b WHERE NOT EXISTS (SELECT FROM latest)) AS l
      WHERE c.op = 'truncate'
        AND {table}
        AND c.captured_at >= l.captured_at AND c.captured_at <= %(at)s
        AND (c.captured_at, c.id) > (l.captured_at, l.id)
      ORDER BY c.captured_at, c.id LIMIT 1)
)
SELECT c.role, {changes}, {transactions}, i.finished AS baseline_finished
  FROM (SELECT) AS one
  LEFT JOIN inforce i ON true
  LEFT JOIN found c ON true
  LEFT JOIN {audit}.transactions t ON {tx_join}
""")

# The table as it was: the state of each row (by the same rules as one row's) from the changes of
# the table and the baseline in force, one row per key, streamed in key order: by each key column's
# value in turn, then by the whole key (which alone tells rows apart).
_TABLE_AS_OF_SQL = sql.SQL("""
WITH b AS (
    SELECT c.transaction_id, c.started_at, c.tracked_since
      FROM (SELECT x.*, x.started_at AS captured_at FROM {audit}.baselines x) c
     WHERE {baseline_table} AND c.started_at <= %(at)s AND c.finished_at IS NOT NULL
       AND (c.ended_at IS NULL OR c.ended_at > %(at)s)
     ORDER BY c.started_at DESC LIMIT 1
), tr AS (
    SELECT max(c.captured_at) FILTER (WHERE c.captured_at <= %(at)s) AS at,
           min(c.captured_at) FILTER (WHERE c.captured_at > %(at)s) AS next
      FROM {audit}.changes c
     WHERE c.op = 'truncate' AND {truncate_table}
), pick AS (
    SELECT DISTINCT ON ({key_order}) c.op, c.after, c.before, c.captured_at, k.class
      FROM {audit}.changes c CROSS JOIN b CROSS JOIN tr
     CROSS JOIN LATERAL (SELECT CASE WHEN c.op = 'snapshot' THEN 2
                                     WHEN c.captured_at <= %(at)s THEN 0 ELSE 1 END AS class) k
     WHERE {table} AND c.op <> 'truncate'
       AND CASE WHEN c.op = 'snapshot' THEN c.transaction_id = b.transaction_id
                WHEN c.captured_at <= %(at)s THEN c.captured_at >= b.tracked_since
                -- a change after a truncate that followed the time asked tells nothing of the row then
                ELSE tr.next IS NULL OR c.captured_at < tr.next END
     ORDER BY {key_order}, k.class,
              CASE WHEN k.class = 0 THEN c.captured_at END DESC, CASE WHEN k.class = 0 THEN c.id END DESC,
              CASE WHEN k.class = 1 THEN c.captured_at END, CASE WHEN k.class = 1 THEN c.id END,
              c.id DESC
)
SELECT CASE WHEN p.class = 1 THEN p.before ELSE p.after END
  FROM pick p, tr, b
 WHERE CASE p.class
         WHEN 0 THEN p.op <> 'delete' AND (tr.at IS NULL OR tr.at < p.captured_at)
         WHEN 1 THEN p.op <> 'insert'
         ELSE tr.at IS NULL OR tr.at < b.started_at
       END
""")


class NoBaseline(AsOfError):
    """The table had no complete baseline in force at the time asked, so rows that had not changed
    since tracking began are unknown: take one with :func:`threadline.take_baseline`."""


def _as_of_plan(table: str, pk: Any, at: datetime, audit_schema: str) -> Plan[dict[str, Any]]:
    audit = audit_identifier(audit_schema)
    if at is None:
        raise InvalidFilter("at is required")
    moment = check_time("at", at)
    ref = yield from resolve_table(table, audit_schema)
    key = normalize_key(ref, pk)
    row_of = f"{ref} ({_pk_text(key)})"
    params: dict[str, Any] = {"pk": Jsonb(key), "at": moment}
    partitioned = yield from partitioned_plan(audit_schema)
    rows = yield Query(
        _AS_OF_SQL.format(
            tx_join=transaction_join(partitioned),
            audit=audit,
            changes=CHANGE_COLUMNS,
            transactions=TRANSACTION_COLUMNS,
            table=ref.condition(params),
            baseline_table=ref.condition(params),
        ),
        params,
    )
    # whether the table's baseline in force then is complete (None: no baseline was in force)
    in_force: bool | None = rows[0]["baseline_finished"] if rows else None
    rows = [row for row in rows if row["role"] is not None]
    found = {row["role"]: change for row, change in zip(rows, changes_from_rows(rows), strict=True)}
    latest = found.get("latest")
    truncate = found.get("truncate")
    if latest is None:
        first = found.get("first")  # the row's earliest change after the time asked
        snapshot = found.get("snapshot")
        if in_force is not None:
            # the table was tracked then (its baseline had begun), so every change since is known;
            # the row's next change tells what it was then, unless the table was truncated before it
            emptied = found.get("next truncate")
            if first is not None and emptied is not None and emptied.captured_at < first.captured_at:
                first = None
            if first is not None and first.op in ("update", "delete"):
                # the row did not change between the time asked and this change
                assert first.before is not None
                return dict(first.before)
            if first is not None and first.op == "insert":
                raise NotYetAudited(
                    f"{row_of} did not exist at {iso(moment)}: it was inserted at {iso(first.captured_at)}",
                    first_change=first,
                )
            if snapshot is not None:
                if truncate is not None:
                    raise _truncated(row_of, ref, truncate)
                assert snapshot.after is not None
                return dict(snapshot.after)
            if in_force:
                raise NotYetAudited(
                    f"{row_of} did not exist at {iso(moment)}: {ref}'s baseline has no such row,"
                    " and no change of it is captured since",
                    first_change=first,
                )
            raise NotYetAudited(
                f"{row_of} is not known at {iso(moment)}: {ref}'s baseline had not reached it,"
                " and it has no captured change since (take the baseline again to finish it)",
                first_change=first,
            )
        if first is None:
            detail = "it has no captured change at all"
        elif first.op == "insert":
            detail = f"it was inserted at {iso(first.captured_at)}, so it most likely did not exist yet"
        else:
            detail = (
                f"its earliest captured change is {_article(first.op)} {first.op} at {iso(first.captured_at)}"
            )
        raise NotYetAudited(
            f"{row_of} has no captured change at or before {iso(moment)}: {detail}", first_change=first
        )
    if latest.op == "delete":
        raise RowDeleted(
            f"{row_of} was deleted at {iso(latest.captured_at)}", change=latest, deleted_at=latest.captured_at
        )
    if truncate is not None:
        raise _truncated(row_of, ref, truncate)
    assert latest.after is not None
    return dict(latest.after)


def _truncated(row_of: str, ref: Any, truncate: Change) -> RowDeleted:
    return RowDeleted(
        f"{row_of} was removed when {ref} was truncated at {iso(truncate.captured_at)}",
        change=truncate,
        deleted_at=truncate.captured_at,
    )


def _table_plan(table: str, at: datetime, audit_schema: str) -> Plan[tuple[sql.Composed, dict[str, Any]]]:
    audit = audit_identifier(audit_schema)
    moment = check_time("at", at)
    ref = yield from resolve_table(table, audit_schema)
    params: dict[str, Any] = {"at": moment}
    # one key column: the keys themselves compare by its value
    composite = ref.keys if ref.keys is not None and len(ref.keys) > 1 else ()
    statement = _TABLE_AS_OF_SQL.format(
        audit=audit,
        baseline_table=ref.condition(params),
        truncate_table=ref.condition(params),
        table=ref.condition(params),
        key_order=sql.SQL(", ").join(
            [*(sql.SQL("c.pk -> {}").format(sql.Literal(k)) for k in composite), sql.SQL("c.pk")]
        ),
    )
    found = yield Query(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE c.started_at <= %(at)s AND c.finished_at IS NOT NULL"
            "                         AND (c.ended_at IS NULL OR c.ended_at > %(at)s)) AS usable,"
            " min(c.started_at) FILTER (WHERE c.ended_at IS NULL) AS current_start,"
            " bool_or(c.finished_at IS NULL AND c.ended_at IS NULL) AS unfinished"
            " FROM (SELECT x.*, x.started_at AS captured_at FROM {audit}.baselines x) c WHERE {table}"
        ).format(audit=audit, table=ref.condition(params)),
        params,
    )
    info = found[0]
    if not info["usable"]:
        if info["unfinished"]:
            detail = "its baseline is not complete: take it again to finish it (threadline baseline)"
        elif info["current_start"] is not None:
            detail = f"its baseline was taken at {iso(info['current_start'])}, after that time"
        else:
            detail = "it has no baseline: take one with threadline.take_baseline() (threadline baseline)"
        raise NoBaseline(f"{ref} cannot be shown as it was at {iso(moment)}: {detail}")
    return statement, params


def _table_rows(
    conn: ConnectionLike, table: str, at: datetime, audit_schema: str
) -> Generator[dict[str, Any], None, None]:
    statement, params = run(conn, _table_plan(table, at, audit_schema))
    return _stream_rows(conn, statement, params)


def _stream_rows(
    conn: ConnectionLike, statement: sql.Composed, params: dict[str, Any]
) -> Generator[dict[str, Any], None, None]:
    raw, from_django = native(conn)
    # a plain psycopg cursor in streaming mode: rows arrive as the server sends them, so memory
    # stays flat however large the table (the server sorts the changes by key, spilling to disk)
    with psycopg.Cursor(raw) as cur:
        if from_django:
            json_adapters(cur.adapters)
        for (image,) in cur.stream(statement, params, size=1000):
            yield dict(image)


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
        return _table_rows(conn, table, at, audit_schema)
    return run(conn, _as_of_plan(table, pk, at, audit_schema))


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
        statement, params = await run_async(conn, _table_plan(table, at, audit_schema))
        return _table_rows_async(conn, statement, params)
    return await run_async(conn, _as_of_plan(table, pk, at, audit_schema))


async def _table_rows_async(
    conn: psycopg.AsyncConnection[Any], statement: sql.Composed, params: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    async with psycopg.AsyncCursor(conn) as cur:
        async for (image,) in cur.stream(statement, params, size=1000):
            yield dict(image)
