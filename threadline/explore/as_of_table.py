"""A whole table as it was at a time, streamed: the statement and the plan behind
``as_of(conn, table, at=...)``.

One statement over the table's changes applies to every key the rules that give one row as it
was (:mod:`threadline.explore.as_of_row`), and its rows are streamed with flat memory.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from threadline.core._connection import ConnectionLike, native
from threadline.core._run import Plan, Query, run
from threadline.core.records import from_json, iso
from threadline.explore.arguments import audit_identifier, check_time
from threadline.explore.as_of_errors import NoBaseline
from threadline.explore.export_rows import chunked_streaming
from threadline.explore.selection import has_unreadable_escape, partitioned_plan, truncate_change_join
from threadline.explore.tables import resolve_table

__all__ = ["table_as_of_plan", "table_rows", "table_rows_async"]

# The table as it was: the state of each row (by the same rules as one row's) from the changes of
# the table and the baseline in force, one row per key, streamed in key order: by each key column's
# value in turn, then by the whole key (which alone tells rows apart). A row known from its next
# change is that change's before image completed from its after image (before_row()), which json
# functions cannot do on an image holding an escape the database cannot decode (a json column's
# value with \u0000 or half a surrogate pair): such a row comes as its two images instead,
# completed in Python (:func:`_before_row`). Images come as text, parsed as every reader parses
# them (:func:`~threadline.core.records.from_json`: a number a float cannot hold is a Decimal).
_TABLE_AS_OF_SQL = sql.SQL("""
WITH b AS (
    SELECT c.transaction_id, c.started_at, c.tracked_since
      FROM (SELECT x.*, x.started_at AS captured_at FROM {audit}.baselines x) c
     WHERE {baseline_table} AND c.started_at <= %(at)s AND c.finished_at IS NOT NULL
       AND (c.ended_at IS NULL OR c.ended_at > %(at)s)
     ORDER BY c.started_at DESC LIMIT 1
), tr AS (
    SELECT max(x.captured_at) FILTER (WHERE x.captured_at <= %(at)s) AS at,
           min(x.captured_at) FILTER (WHERE x.captured_at > %(at)s) AS next
      FROM {audit}.truncates x JOIN {audit}.changes c ON {truncate_join}
     WHERE {truncate_table}
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
SELECT (CASE WHEN p.class <> 1 THEN p.after WHEN NOT n.unreadable THEN {audit}.before_row(p.before, p.after) END)::text,
       (CASE WHEN n.unreadable THEN p.before END)::text, (CASE WHEN n.unreadable THEN p.after END)::text
  FROM pick p CROSS JOIN LATERAL (SELECT p.class = 1 AND coalesce({unreadable}, false) AS unreadable) n, tr, b
 WHERE CASE p.class
         WHEN 0 THEN p.op <> 'delete' AND (tr.at IS NULL OR tr.at < p.captured_at)
         WHEN 1 THEN p.op <> 'insert'
         ELSE tr.at IS NULL OR tr.at < b.started_at
       END
""")


def table_as_of_plan(
    table: str, at: datetime, audit_schema: str
) -> Plan[tuple[sql.Composed, dict[str, Any]]]:
    """The statement (and its parameters) that reads ``table`` as it was at ``at``; raises
    :class:`NoBaseline` when no complete baseline of it was in force then."""
    audit = audit_identifier(audit_schema)
    moment = check_time("at", at)
    ref = yield from resolve_table(table, audit_schema)
    params: dict[str, Any] = {"at": moment}
    # one key column: the keys themselves compare by its value
    composite = ref.keys if ref.keys is not None and len(ref.keys) > 1 else ()
    partitioned = yield from partitioned_plan(audit_schema)
    statement = _TABLE_AS_OF_SQL.format(
        audit=audit,
        baseline_table=ref.condition(params),
        truncate_table=ref.condition(params, "x"),
        truncate_join=truncate_change_join(partitioned),
        table=ref.condition(params),
        key_order=sql.SQL(", ").join(
            [*(sql.SQL("c.pk -> {}").format(sql.Literal(k)) for k in composite), sql.SQL("c.pk")]
        ),
        unreadable=sql.SQL(
            f"{has_unreadable_escape('p.before', '{audit}')} OR {has_unreadable_escape('p.after', '{audit}')}"
        ).format(audit=audit),
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


def table_rows(
    conn: ConnectionLike, table: str, at: datetime, audit_schema: str
) -> Generator[dict[str, Any], None, None]:
    """The rows of ``table`` as it was at ``at``, streamed from ``conn`` (see :func:`threadline.as_of`)."""
    statement, params = run(conn, table_as_of_plan(table, at, audit_schema))
    return _stream_rows(conn, statement, params)


def _stream_rows(
    conn: ConnectionLike, statement: sql.Composed, params: dict[str, Any]
) -> Generator[dict[str, Any], None, None]:
    raw, _ = native(conn)
    # a plain psycopg cursor in streaming mode: rows arrive as the server sends them, so memory
    # stays flat however large the table (the server sorts the changes by key, spilling to disk)
    with psycopg.Cursor(raw) as cur:
        for image, before, after in cur.stream(statement, params, size=_stream_size()):
            yield _row(image, before, after)


def _stream_size() -> int:
    """Rows per chunk of the stream: 1,000 where libpq streams in chunks (17 and later), else one
    at a time (libpq's single-row mode), which every libpq supports."""
    return 1000 if chunked_streaming() else 1


def _row(image: str | None, before: str | None, after: str | None) -> dict[str, Any]:
    """A row of the statement: its image, else its next change's two images completed."""
    if image is not None:
        return dict(from_json(image))
    return _before_row(from_json(before), from_json(after))


def _before_row(before: Any, after: Any) -> dict[str, Any]:
    """The schema's ``before_row(before, after)``: an update's before image completed from its
    after image (``after``'s keys in order, then those only ``before`` has; ``before``'s values)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {**after, **before}
    return dict(before)


async def table_rows_async(
    conn: psycopg.AsyncConnection[Any], statement: sql.Composed, params: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """The rows that ``statement`` (from :func:`table_as_of_plan`) reads, streamed from ``conn``."""
    async with psycopg.AsyncCursor(conn) as cur:
        async for image, before, after in cur.stream(statement, params, size=_stream_size()):
            yield _row(image, before, after)
