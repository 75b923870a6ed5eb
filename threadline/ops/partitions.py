"""The partitioned audit store: its settings, its partitions, and creating them ahead of time.

A new install range-partitions ``transactions`` and ``changes`` by the transaction's start time
(``occurred_at``; monthly unless :func:`threadline.install` is told otherwise), so a transaction
and its changes always share a partition and retention drops whole partitions
(:mod:`threadline.ops.retention`). Each table also has a DEFAULT partition, so a write never fails
for want of a partition; :func:`create_partitions` moves rows that landed there into the period's
partition when it creates it.

:func:`create_partitions` keeps the current period and ``ahead`` more (3 by default) ready. Run
it periodically off the write path (``threadline partitions --create``, or a Celery beat entry as
shown in ``docs/operations.md``). Creating a partition briefly locks the parent table; it is
attempted under ``lock_timeout`` and retried, so it never queues the application's writes for
longer than that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.core.busy import TABLES_BUSY
from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.schema import require_installed

__all__ = [
    "Partition",
    "PartitionSettings",
    "create_partitions",
    "is_partitioned",
    "partition_settings",
    "partitions",
    "set_partitions_ahead",
]

logger = logging.getLogger("threadline.partitions")

MAX_AHEAD = 120


@dataclass(frozen=True)
class PartitionSettings:
    """How a partitioned store is partitioned."""

    period: str
    """One of ``day``, ``week``, ``month``, ``quarter``, ``year`` (UTC boundaries)."""
    ahead: int
    """How many periods after the current one :func:`create_partitions` keeps ready."""


@dataclass(frozen=True)
class Partition:
    """One partition of ``transactions`` or ``changes``."""

    table: str
    """``transactions`` or ``changes``."""
    name: str
    range_from: datetime | None
    """Inclusive lower bound (``None`` for the DEFAULT partition)."""
    range_to: datetime | None
    """Exclusive upper bound (``None`` for the DEFAULT partition)."""
    rows: int
    """Rows, as estimated by the last ANALYZE (exact for the DEFAULT partition)."""
    bytes: int
    """Size on disk, indexes and TOAST included."""

    @property
    def is_default(self) -> bool:
        """Whether this is the DEFAULT partition (rows no other partition's range holds)."""
        return self.range_from is None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "table": self.table,
            "name": self.name,
            "from": _utc_iso(self.range_from),
            "to": _utc_iso(self.range_to),
            "rows": self.rows,
            "bytes": self.bytes,
        }


def _utc_iso(at: datetime | None) -> str | None:
    """A bound in ISO 8601, in UTC as the periods are cut, whatever the session's time zone."""
    return None if at is None else at.astimezone(timezone.utc).isoformat()


def audit_identifier(audit_schema: str) -> sql.Identifier:
    check_schema_name(audit_schema)
    return sql.Identifier(audit_schema)


def is_partitioned(conn: psycopg.Connection[Any], audit_schema: str = DEFAULT_SCHEMA) -> bool:
    """Whether the audit schema's ``changes`` table is partitioned."""
    check_schema_name(audit_schema)
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = to_regclass(format('%%I.changes', %s::text))",
        [audit_schema],
    ).fetchone()
    return bool(row and row[0])


def partition_settings(
    conn: psycopg.Connection[Any], audit_schema: str = DEFAULT_SCHEMA
) -> PartitionSettings | None:
    """The store's partitioning, or ``None`` when its tables are plain."""
    if not is_partitioned(conn, audit_schema):
        return None
    row = conn.execute(
        sql.SQL("SELECT period, ahead FROM {}.partitioning").format(audit_identifier(audit_schema))
    ).fetchone()
    return None if row is None else PartitionSettings(row[0], row[1])


def partitions(conn: psycopg.Connection[Any], audit_schema: str = DEFAULT_SCHEMA) -> list[Partition]:
    """The partitions of both tables, in range order (the DEFAULT partitions last); empty for a
    plain store."""
    audit = audit_identifier(audit_schema)
    require_installed(conn, audit_schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT p.parent, p.partition, p.range_from, p.range_to,"
            " greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)"
            " FROM {a}.partitions() p JOIN pg_class c ON c.relname = p.partition"
            " AND c.relnamespace = %s::regnamespace"
        ).format(a=audit),
        [audit_schema],
    ).fetchall()
    out = []
    for table, name, lo, hi, estimate, size in rows:
        count = estimate
        if lo is None:
            exact = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(audit_schema, name))
            )
            count = (exact.fetchone() or (0,))[0]
        out.append(Partition(table, name, lo, hi, int(count), int(size)))
    return out


def set_partitions_ahead(
    conn: psycopg.Connection[Any], ahead: int, audit_schema: str = DEFAULT_SCHEMA
) -> None:
    """Keep ``ahead`` periods after the current one ready from now on (it persists)."""
    if isinstance(ahead, bool) or not isinstance(ahead, int) or not 1 <= ahead <= MAX_AHEAD:
        raise ConfigurationError(f"ahead must be an integer from 1 to {MAX_AHEAD}, not {ahead!r}")
    if partition_settings(conn, audit_schema) is None:
        raise ConfigurationError(
            f"the audit store of schema {audit_schema!r} is not partitioned: `threadline partition --migrate` "
            "partitions it"
        )
    conn.execute(
        sql.SQL("UPDATE {}.partitioning SET ahead = %s").format(audit_identifier(audit_schema)), [ahead]
    )


def create_partitions(
    conn: psycopg.Connection[Any],
    *,
    ahead: int | None = None,
    since: datetime | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
    lock_timeout: float = 2.0,
    attempts: int = 5,
) -> int:
    """Create the partitions of the current period and of the next ``ahead`` periods (the stored
    setting when ``None``), and the DEFAULT partitions, where missing; returns how many it created
    (0 for a plain store). With ``since`` (an aware datetime), every period from the one holding it
    is created too: rows the DEFAULT partition holds for those periods move into them.

    Runs in its own transaction, so ``conn`` must not be inside one. Each attempt waits at most
    ``lock_timeout`` seconds for its locks; a busy table (a lock not granted in time, or a deadlock
    with a writer) is retried up to ``attempts`` times, with a growing pause, before the last
    :class:`psycopg.errors.LockNotAvailable` or :class:`psycopg.errors.DeadlockDetected` is raised.
    """
    audit = audit_identifier(audit_schema)
    if ahead is not None and (
        isinstance(ahead, bool) or not isinstance(ahead, int) or not 0 <= ahead <= MAX_AHEAD
    ):
        raise ConfigurationError(f"ahead must be an integer from 0 to {MAX_AHEAD}, not {ahead!r}")
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise ConfigurationError(f"since must be a timezone-aware datetime, not {since!r}")
    if lock_timeout <= 0 or attempts < 1:
        raise ConfigurationError("lock_timeout must be positive and attempts at least 1")
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ConfigurationError(
            "create_partitions() commits its own transaction: call it on a connection with no open transaction"
        )
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"])
                row = conn.execute(
                    sql.SQL("SELECT {}.create_partitions(%s, %s)").format(audit), [ahead, since]
                ).fetchone()
            made = int(row[0]) if row else 0
            if made:
                logger.info("created %d audit partitions in schema %s", made, audit_schema)
            return made
        except TABLES_BUSY:
            if attempt == attempts:
                raise
            logger.info("audit partitions: a table is busy, retrying (%d of %d)", attempt, attempts)
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")
