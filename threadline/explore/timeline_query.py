"""The timeline (:func:`timeline`): changes with their transaction context, ordered by
``(captured_at, id)``, one page at a time, complete while others write (see
:mod:`threadline.explore.paging`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, overload

import psycopg
from psycopg import sql

from threadline.core._connection import ConnectionLike
from threadline.core._run import Plan, Query, Rows, run, run_async
from threadline.core.records import Change
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore import paging
from threadline.explore.arguments import ActorLike, audit_identifier, check_limit
from threadline.explore.selection import (
    Filters,
    change_columns,
    filters_plan,
    where_clause,
    with_transactions,
)

__all__ = ["TimelinePage", "timeline", "timeline_async"]


@dataclass(frozen=True)
class TimelinePage(Sequence[Change]):
    """One page of :func:`timeline`: a sequence of changes, oldest first, and the cursor of the
    next page (``None`` on the last page)."""

    changes: tuple[Change, ...]
    next_cursor: str | None
    filters: Filters
    cursor: str = ""
    """Where a later call resumes, also on the last page: passing it as ``after`` returns every
    change committed since, including those of transactions that were still running."""

    @overload
    def __getitem__(self, index: int) -> Change: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Change]: ...

    def __getitem__(self, index: int | slice) -> Change | Sequence[Change]:
        return self.changes[index]

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)


def _timeline_plan(
    correlation_id: str | None,
    table: str | None,
    actor: ActorLike | None,
    op: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: str | None,
    audit_schema: str,
) -> Plan[TimelinePage]:
    audit = audit_identifier(audit_schema)
    checked = check_limit(limit, allow_none=False)
    assert checked is not None
    filters = yield from filters_plan(
        correlation_id=correlation_id,
        table=table,
        actor=actor,
        op=op,
        since=since,
        until=until,
        audit_schema=audit_schema,
    )
    position = paging.START if after is None else paging.decode(after, filters.fingerprint())
    rows: Rows = []
    start = yield from _window_start(audit, filters, position)
    width = FIRST_WINDOW
    for attempt in range(MAX_WINDOWS + 1):
        bound = window_end(start, width, filters.until) if attempt < MAX_WINDOWS else None
        params: dict[str, Any] = {}
        where = partial(where_clause, filters)
        if bound is not None:
            params["window_end"] = bound
            where = partial(_within, filters, sql.SQL("c.captured_at < %(window_end)s"))
        statement = paging.page_statement(
            audit,
            *change_columns(audit, filters.partitioned),
            where,
            position,
            checked,
            params,
            tx_join=filters.tx_join,
            forward_join=filters.reads_transactions,
        )
        rows = yield Query(statement, params)
        # a window holding more than a page holds the page (everything captured earlier is in it)
        forward = sum(1 for r in rows if r["phase"] == paging.FORWARD)
        if bound is None or forward > checked:
            break
        width = next_window(width, forward, checked + 1)
    reader = paging.Reader(position, checked)
    taken: Rows = []
    snapshot = paging.Snapshot(0, frozenset())
    for row in rows:
        if row["phase"] == paging.CLOSING:
            snapshot = paging.parse_snapshot(row["k_xip"])
        elif reader.take(row["phase"], row["k_xid"], row["k_tid"], row["k_at"], row["k_id"]):
            taken.append(row)
    position, more = reader.close(snapshot)
    found = yield from with_transactions(audit, taken)
    cursor = paging.encode(position, filters.fingerprint())
    return TimelinePage(tuple(found), cursor if more else None, filters, cursor)


# Windows of capture time a timeline page is looked for in, from its start, when no filter has an
# index of its own (a table or an operation alone): each is read through the BRIN index on
# captured_at, so a page of a busy table costs a few block ranges instead of a scan of all changes.
# The first window is an hour; each next one is sized from how many rows the last one held, so a
# page usually takes two windows whatever the table's rate of change.
FIRST_WINDOW = timedelta(hours=1)
LAST_WINDOW = timedelta(days=31)
"""The widest bounded window; past it a page is read without a bound."""
MAX_WINDOWS = 6
"""Bounded windows tried at most before reading without a bound."""
_EMPTY_WINDOW_GROWTH = 24


def next_window(width: timedelta, found: int, wanted: int) -> timedelta:
    """The width of the window to try after one of ``width`` held ``found`` of the ``wanted`` rows:
    wide enough for them at the rate seen, with half again as margin (at least double, and 24
    times when the window held nothing)."""
    growth = _EMPTY_WINDOW_GROWTH if found <= 0 else max(2.0, 1.5 * wanted / found)
    return width * growth


def window_end(start: datetime | None, width: timedelta, until: datetime | None) -> datetime | None:
    """The capture time a window of ``width`` from ``start`` ends at, or ``None`` (read without a
    bound) when there is no start, the window is wider than :data:`LAST_WINDOW`, or it would reach
    past ``until`` (which bounds the read anyway)."""
    if start is None or width > LAST_WINDOW:
        return None
    try:
        end = start + width
    except OverflowError:  # a start near the end of time: nothing lies past it anyway
        return None
    return None if until is not None and end >= until else end


def _within(
    filters: Filters, bound: sql.Composable, params: dict[str, Any], extra: Sequence[sql.Composable] = ()
) -> sql.Composable:
    return where_clause(filters, params, [*extra, bound])


def _window_start(
    audit: sql.Identifier, filters: Filters, position: paging.Position
) -> Plan[datetime | None]:
    """Where the windows start (``None``: read without a bound): the position reached, the
    ``since`` filter, or the oldest change; no windows for a correlation id or an actor, whose
    indexes find their rows directly."""
    if filters.correlation_id is not None or filters.actor is not None:
        return None
    start = position.at or filters.since
    if start is None:
        # the oldest change: its transaction is the first one still held (the key's first entry)
        found = yield Query(
            sql.SQL("SELECT c.captured_at FROM {}.changes c ORDER BY c.transaction_id, c.id LIMIT 1").format(
                audit
            ),
            {},
        )
        if not found:
            return None
        start = found[0]["captured_at"]
    return start


def timeline(
    conn: ConnectionLike,
    *,
    correlation_id: str | None = None,
    table: str | None = None,
    actor: ActorLike | None = None,
    op: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    after: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> TimelinePage:
    """Changes with their transaction context, ordered by ``(captured_at, id)``, one page at a
    time: "everything request req-1 caused, including its Celery tasks".

    The correlation id is on every transaction, web and worker alike, so ``correlation_id``
    alone finds the whole story. Pass ``after=page.next_cursor`` for the next page; a cursor is
    bound to the correlation id, table, actor and op filters it was issued for.

    Paging is complete while others write: ``page.cursor`` (set on every page, the last one
    included) resumes later and returns every change committed since, exactly once. A
    transaction that was still running when a page was read, and committed changes captured
    before that page's end, has them returned at the start of a later page (see
    :mod:`threadline.explore.paging`).
    """
    return run(
        conn, _timeline_plan(correlation_id, table, actor, op, since, until, limit, after, audit_schema)
    )


async def timeline_async(
    conn: psycopg.AsyncConnection[Any],
    *,
    correlation_id: str | None = None,
    table: str | None = None,
    actor: ActorLike | None = None,
    op: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    after: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> TimelinePage:
    """Async twin of :func:`timeline`."""
    return await run_async(
        conn, _timeline_plan(correlation_id, table, actor, op, since, until, limit, after, audit_schema)
    )
