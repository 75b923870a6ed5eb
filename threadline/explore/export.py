"""Export captured changes as CSV, JSON or NDJSON, streaming.

Rows are read in batches and written as they arrive, so memory stays flat however many rows match:
streamed in chunks with libpq 17 or later (one statement, which PostgreSQL may run with parallel
workers), else through a server-side cursor. PostgreSQL formats the JSON, so Python only moves
text. Filters are those of :func:`threadline.timeline`; rows come in the timeline's order,
``(captured_at, id)``, and like the timeline an export is complete while others write: the
:class:`ExportResult` it returns carries a cursor, and an export ``after=`` it writes every change
committed since, exactly once (see :mod:`threadline.explore.paging`).

Formats (version :data:`EXPORT_VERSION`):

- ``ndjson``: one JSON object per line, keys :data:`JSON_FIELDS`.
- ``json``: one object ``{"format": "threadline.changes", "version": 1, "exported_at": ...,
  "filters": {...}, "changes": [...]}`` whose ``changes`` are the NDJSON objects.
- ``csv``: a header row, then :data:`CSV_COLUMNS`; JSON values (``pk``, ``before``, ``after``,
  ``changed_fields``, ``job``) as JSON text, NULL as an empty field.

Times are ISO 8601 in UTC with microseconds (``2024-05-01T12:00:00.123456Z``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.rows import tuple_row

from threadline.core._connection import ConnectionLike, native
from threadline.core._run import run, run_async
from threadline.core.errors import InvalidFilter, SchemaError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.explore import paging
from threadline.explore.arguments import ActorLike, check_limit
from threadline.explore.export_rows import (
    BATCH_SIZE,
    ExportResult,
    TextSink,
    _forward_statement,
    _RawTimestamp,
    _statement,
    _timestamp,
    _Writer,
    check_format,
    chunked_streaming,
)
from threadline.explore.selection import Filters, filters_plan

MAX_BATCH_SIZE = 1_000_000
"""The largest batch an export fetches at once."""


def _check(format: str, limit: int | None, audit_schema: str, batch_size: int) -> None:
    check_format(format)
    check_limit(limit, maximum=None)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise InvalidFilter(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {batch_size!r}")
    try:
        check_schema_name(audit_schema)
    except SchemaError as exc:
        raise InvalidFilter(str(exc)) from exc


def export(
    conn: ConnectionLike,
    out: TextSink,
    format: str = "csv",
    *,
    correlation_id: str | None = None,
    table: str | None = None,
    actor: ActorLike | None = None,
    op: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
    batch_size: int = BATCH_SIZE,
    server_cursor: bool | None = None,
    after: str | None = None,
) -> ExportResult:
    """Write the changes matching the filters to ``out``; returns how many were written, as an
    :class:`ExportResult` whose ``cursor`` resumes after them.

    "Hand the auditors everything request req-1 caused":
    ``export(conn, f, "ndjson", correlation_id="req-1")``. An incremental export passes the
    previous result's ``cursor`` as ``after``: it writes every change committed since, including
    those of transactions that were still running during the previous export.

    Rows are read ``batch_size`` at a time, so memory stays flat however many match: with libpq 17
    or later the result streams in chunks (one statement, which PostgreSQL may run with parallel
    workers); with an older libpq, or with ``server_cursor=True``, through a server-side cursor in
    its own transaction (a savepoint if one is open).
    """
    _check(format, limit, audit_schema, batch_size)
    filters = run(
        conn,
        filters_plan(
            correlation_id=correlation_id,
            table=table,
            actor=actor,
            op=op,
            since=since,
            until=until,
            audit_schema=audit_schema,
        ),
    )
    raw, _ = native(conn)
    writer, plan = _plan(
        out, format, filters, limit, audit_schema, after, server_cursor, raw.info.transaction_status
    )
    with raw.transaction() if plan.transaction else contextlib.nullcontext():
        if plan.same_snapshot:
            raw.execute(paging.SAME_SNAPSHOT)
        for step in plan.steps:
            _stream(raw, step, batch_size, plan.server_cursor)
    writer.finish()
    return writer.result()


@dataclass(frozen=True)
class _Step:
    """One statement of an export, and where its rows go."""

    statement: sql.Composed
    params: dict[str, Any]
    sink: Callable[[list[tuple[Any, ...]]], None]


@dataclass(frozen=True)
class _Plan:
    """What an export runs, the same for both kinds of connection: its statements, whether they
    share a transaction (a savepoint if one is open) and a ``REPEATABLE READ`` snapshot, and
    whether rows come through a server-side cursor (which needs the transaction)."""

    steps: tuple[_Step, ...]
    transaction: bool
    same_snapshot: bool
    server_cursor: bool


def _plan(
    out: TextSink,
    format: str,
    filters: Filters,
    limit: int | None,
    audit_schema: str,
    after: str | None,
    server_cursor: bool | None,
    status: pq.TransactionStatus,
) -> tuple[_Writer, _Plan]:
    position = paging.START if after is None else paging.decode(after, filters.fingerprint())
    writer = _Writer(out, format, filters, paging.Reader(position, limit, _timestamp))
    writer.start()
    cursor = not chunked_streaming() if server_cursor is None else server_cursor
    if limit is None and status == pq.TransactionStatus.IDLE:
        # Two statements in one REPEATABLE READ snapshot: the late rows and the snapshot's
        # in-progress list, then the rows in position order as a plain ordered scan (no key
        # columns, no union to sort: as fast as an export without a cursor).
        late, late_params = _statement(format, filters, None, audit_schema, position, forward=False)
        rest, rest_params = _forward_statement(format, filters, audit_schema, position)
        both = (_Step(late, late_params, writer.page_rows), _Step(rest, rest_params, writer.forward_rows))
        return writer, _Plan(both, transaction=True, same_snapshot=True, server_cursor=cursor)
    statement, params = _statement(format, filters, limit, audit_schema, position)
    one = (_Step(statement, params, writer.page_rows),)
    return writer, _Plan(one, transaction=cursor, same_snapshot=False, server_cursor=cursor)


def _stream(raw: psycopg.Connection[Any], step: _Step, batch_size: int, server_cursor: bool) -> None:
    """Feed the rows of ``step`` to its sink ``batch_size`` at a time (a server-side cursor needs
    the transaction the caller opened)."""
    if server_cursor:
        name = f"threadline_export_{uuid.uuid4().hex[:12]}"
        with raw.cursor(name=name, row_factory=tuple_row) as cur:
            cur.adapters.register_loader("timestamptz", _RawTimestamp)
            cur.execute(step.statement, step.params, binary=True)
            while batch := cur.fetchmany(batch_size):
                step.sink(batch)
        return
    # psycopg's own cursor class: a connection may default to client-side binding (Django does),
    # which cannot return binary results
    with psycopg.Cursor(raw, row_factory=tuple_row) as cur:
        cur.adapters.register_loader("timestamptz", _RawTimestamp)
        rows: list[tuple[Any, ...]] = []
        for row in cur.stream(step.statement, step.params, binary=True, size=batch_size):
            rows.append(row)
            if len(rows) >= batch_size:
                step.sink(rows)
                rows = []
        step.sink(rows)


async def export_async(
    conn: psycopg.AsyncConnection[Any],
    out: TextSink,
    format: str = "csv",
    *,
    correlation_id: str | None = None,
    table: str | None = None,
    actor: ActorLike | None = None,
    op: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
    batch_size: int = BATCH_SIZE,
    server_cursor: bool | None = None,
    after: str | None = None,
) -> ExportResult:
    """Async twin of :func:`export` (``out`` is written synchronously, one batch at a time)."""
    _check(format, limit, audit_schema, batch_size)
    filters = await run_async(
        conn,
        filters_plan(
            correlation_id=correlation_id,
            table=table,
            actor=actor,
            op=op,
            since=since,
            until=until,
            audit_schema=audit_schema,
        ),
    )
    writer, plan = _plan(
        out, format, filters, limit, audit_schema, after, server_cursor, conn.info.transaction_status
    )
    async with conn.transaction() if plan.transaction else contextlib.nullcontext():
        if plan.same_snapshot:
            await conn.execute(paging.SAME_SNAPSHOT)
        for step in plan.steps:
            await _stream_async(conn, step, batch_size, plan.server_cursor)
    writer.finish()
    return writer.result()


async def _stream_async(
    conn: psycopg.AsyncConnection[Any], step: _Step, batch_size: int, server_cursor: bool
) -> None:
    """Async twin of :func:`_stream`."""
    if server_cursor:
        name = f"threadline_export_{uuid.uuid4().hex[:12]}"
        async with conn.cursor(name=name, row_factory=tuple_row) as cur:
            cur.adapters.register_loader("timestamptz", _RawTimestamp)
            await cur.execute(step.statement, step.params, binary=True)
            while batch := await cur.fetchmany(batch_size):
                step.sink(batch)
        return
    async with conn.cursor(row_factory=tuple_row) as acur:
        acur.adapters.register_loader("timestamptz", _RawTimestamp)
        rows: list[tuple[Any, ...]] = []
        async for row in acur.stream(step.statement, step.params, binary=True, size=batch_size):
            rows.append(row)
            if len(rows) >= batch_size:
                step.sink(rows)
                rows = []
        step.sink(rows)
