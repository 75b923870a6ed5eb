"""Baselines: the rows a tracked table holds, recorded once, so its story starts with them.

:func:`take_baseline` records every row of a tracked table as a ``snapshot`` change, all of them
under one transaction row marked as the baseline (``meta.baseline`` names the table). It reads
the table in key order, ``batch_size`` rows per batch, each batch its own transaction: a batch
holds the table's ``ACCESS SHARE`` lock (which blocks no write) and no lock longer than itself.
Progress is stored with each batch, so an interrupted baseline continues where it stopped when
taken again, with no snapshot missing or recorded twice. Masks and excludes apply as in capture.

Once a table has a baseline, :func:`threadline.as_of` and :func:`threadline.history` know its
rows that have not changed since, and :func:`threadline.as_of` without a key gives the whole
table as it was (see :mod:`threadline.explore.as_of_query`). ``threadline coverage`` shows each table's
baseline. From SQL: ``CALL threadline.take_baseline('orders')`` outside a transaction block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.core.errors import ConfigurationError, TrackingError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.registry import parse_table_name
from threadline.ops.partition_migration import refuse_during_migration
from threadline.propagation.psycopg import transaction

__all__ = ["Baseline", "BaselineProgress", "baseline_sql", "baselines", "take_baseline"]

logger = logging.getLogger("threadline.baseline")

DEFAULT_BATCH_SIZE = 10_000


@dataclass(frozen=True)
class BaselineProgress:
    """Where a baseline stands after a batch."""

    table: str
    """The table, schema-qualified."""
    baseline_id: int
    """The baseline's row in the audit schema's ``baselines`` table."""
    batch_rows: int
    """Rows recorded by the batch just committed."""
    rows: int
    """Rows recorded by the baseline so far (all batches, earlier runs included)."""
    estimated_rows: int | None
    """The table's size as PostgreSQL's statistics estimate it (``None`` before its first ANALYZE)."""
    finished: bool
    """Every row is recorded."""


@dataclass(frozen=True)
class Baseline:
    """A table's baseline as the audit schema records it."""

    table_schema: str
    table_name: str
    transaction_id: int
    """The transaction row every snapshot of the baseline belongs to."""
    rows: int
    started_at: datetime
    finished_at: datetime | None
    """``None`` while it is being taken (or was interrupted: take it again to continue)."""
    ended_at: datetime | None
    """When the table was untracked (the baseline no longer describes it); ``None`` while current."""


def baseline_sql(
    table: str, *, batch_size: int = DEFAULT_BATCH_SIZE, audit_schema: str = DEFAULT_SCHEMA
) -> str:
    """The SQL statement that takes ``table``'s baseline (a ``CALL``, to run outside a transaction block)."""
    check_schema_name(audit_schema)
    _check_batch_size(batch_size)
    statement = sql.SQL("CALL {}.take_baseline({}::regclass, {});\n").format(
        sql.Identifier(audit_schema), sql.Literal(_table_text(table)), sql.Literal(batch_size)
    )
    return statement.as_string(None)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")


def _table_text(table: str) -> str:
    """``table`` as regclass input: each part quoted, so any name is taken as written."""
    schema, name = parse_table_name(table)
    return (sql.Identifier(schema, name) if schema else sql.Identifier(name)).as_string(None)


def _regclass(conn: psycopg.Connection[Any], table: str) -> tuple[int, str]:
    row = conn.execute(
        "SELECT c.oid::bigint, format('%%I.%%I', n.nspname, c.relname)"
        "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass(%s)",
        [_table_text(table)],
    ).fetchone()
    if row is None:
        raise TrackingError(
            f"table {table!r} not found (give it as [schema.]table, as it is named in PostgreSQL)"
        )
    return row[0], row[1]


def take_baseline(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    audit_schema: str = DEFAULT_SCHEMA,
    progress: Callable[[BaselineProgress], None] | None = None,
) -> BaselineProgress:
    """Record every row of the tracked ``table`` as a ``snapshot`` change, in batches; idempotent.

    Continues an interrupted baseline where its last committed batch stopped; a table whose
    baseline is complete is left as it is (returned with ``batch_rows=0``). ``conn`` must not be
    inside a transaction: each batch commits. The baseline's transaction row carries the current
    audit context, so it names who took it. ``progress`` is called after every batch.
    """
    check_schema_name(audit_schema)
    _check_batch_size(batch_size)
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ConfigurationError(
            "take_baseline() commits after every batch: call it on a connection with no open transaction"
        )
    oid, name = _regclass(conn, table)
    statement = sql.SQL(
        "SELECT b.baseline_id, b.batch_rows, b.total_rows, b.finished,"
        " (SELECT nullif(greatest(c.reltuples, -1), -1)::bigint FROM pg_class c WHERE c.oid = %s)"
        " FROM {}.baseline_batch(%s::oid::regclass, %s) AS b"
    ).format(sql.Identifier(audit_schema))
    while True:
        try:
            with transaction(conn):
                refuse_during_migration(conn, audit_schema, "a baseline")
                row = conn.execute(statement, [oid, oid, batch_size]).fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            raise TrackingError(_message(exc)) from None
        assert row is not None
        step = BaselineProgress(
            table=name,
            baseline_id=row[0],
            batch_rows=row[1],
            rows=row[2],
            estimated_rows=row[4],
            finished=row[3],
        )
        logger.debug("baseline of %s: %d rows so far", name, step.rows)
        if progress is not None:
            progress(step)
        if step.finished:
            logger.info("baseline of %s complete: %d rows", name, step.rows)
            return step


def _message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc)
    return f"{text}. {diag.message_hint}" if diag.message_hint else text


def baselines(conn: psycopg.Connection[Any], *, audit_schema: str = DEFAULT_SCHEMA) -> list[Baseline]:
    """Every baseline recorded, current ones and those of tables untracked since, oldest first."""
    check_schema_name(audit_schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT table_schema, table_name, transaction_id, rows_done, started_at, finished_at, ended_at"
            "  FROM {}.baselines ORDER BY id"
        ).format(sql.Identifier(audit_schema))
    ).fetchall()
    return [Baseline(*row) for row in rows]
