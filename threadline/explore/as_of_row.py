"""One row as it was at a time: the statement and the plan behind ``as_of(conn, table, pk, at)``.

One statement finds the row's latest captured change at or before the time asked (through the
key index of ``changes``), the table's baseline in force then, and when there is no such change the
row's earliest one after it and its baseline snapshot, and the truncates of the table around
that time; the row is the after image of the latest change, or else what the next change, the
baseline and the truncates tell.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from threadline.core._run import Plan, Query
from threadline.core.errors import InvalidFilter
from threadline.core.records import Change, iso
from threadline.explore.arguments import audit_identifier, check_time
from threadline.explore.as_of_errors import NotYetAudited, RowDeleted
from threadline.explore.selection import (
    TRANSACTION_COLUMNS,
    change_columns_sql,
    changes_from_rows,
    partitioned_plan,
    transaction_join,
    truncate_change_join,
)
from threadline.explore.tables import key_condition, key_json, normalize_key, resolve_table

__all__ = ["row_as_of_plan"]


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _pk_text(pk: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pk.items())


# One round trip: the row's changes (found through the key index alone), the table's baseline in
# force at the time asked, the row's latest change at or before that time, and when there is none
# its earliest one after it (its before image is the row then) and its snapshot in that baseline;
# and a truncate of the table in between. Snapshots never outrank a change captured while the table
# was tracked as it is now: a baseline batch may read a row while a change to it is still
# uncommitted, so its snapshot can be older than its time. A change from before that (the table was
# untracked in between, so its rows may have changed unseen) is outdated by the baseline.
_AS_OF_SQL = sql.SQL("""
WITH r AS MATERIALIZED (
    SELECT c.* FROM {audit}.changes c
     WHERE {key} AND {table}
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
    (SELECT 'next truncate', c.* FROM {audit}.truncates x JOIN {audit}.changes c ON {truncate_join}
      WHERE {truncate_table} AND x.captured_at > %(at)s AND NOT EXISTS (SELECT FROM latest)
      ORDER BY x.captured_at, x.change_id LIMIT 1)
    UNION ALL
    (SELECT 'truncate', c.* FROM {audit}.truncates x JOIN {audit}.changes c ON {truncate_join},
            (SELECT l.captured_at, l.id FROM latest l WHERE l.op <> 'delete'
             UNION ALL
             SELECT b.started_at, 0 FROM b WHERE NOT EXISTS (SELECT FROM latest)) AS l
      WHERE {truncate_table}
        AND x.captured_at >= l.captured_at AND x.captured_at <= %(at)s
        AND (x.captured_at, x.change_id) > (l.captured_at, l.id)
      ORDER BY x.captured_at, x.change_id LIMIT 1)
)
SELECT c.role, {changes}, {transactions}, i.finished AS baseline_finished
  FROM (SELECT) AS one
  LEFT JOIN inforce i ON true
  LEFT JOIN found c ON true
  LEFT JOIN {audit}.transactions t ON {tx_join}
""")


def row_as_of_plan(table: str, pk: Any, at: datetime, audit_schema: str) -> Plan[dict[str, Any]]:
    """The row of ``table`` keyed ``pk`` as it was at ``at``, as a dict; raises :class:`RowDeleted`
    or :class:`NotYetAudited` (see :func:`threadline.as_of`)."""
    audit = audit_identifier(audit_schema)
    if at is None:
        raise InvalidFilter("at is required")
    moment = check_time("at", at)
    ref = yield from resolve_table(table, audit_schema)
    key = normalize_key(ref, pk)
    row_of = f"{ref} ({_pk_text(key)})"
    params: dict[str, Any] = {"pk": Jsonb(key, dumps=key_json), "at": moment}
    partitioned = yield from partitioned_plan(audit_schema)
    rows = yield Query(
        _AS_OF_SQL.format(
            tx_join=transaction_join(partitioned),
            audit=audit,
            changes=change_columns_sql(audit),
            transactions=TRANSACTION_COLUMNS,
            key=key_condition("%(pk)s::jsonb"),
            table=ref.condition(params),
            baseline_table=ref.condition(params),
            truncate_table=ref.condition(params, "x"),
            truncate_join=truncate_change_join(partitioned),
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
