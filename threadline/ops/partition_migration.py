"""Move a plain audit store to the partitioned layout online: batched copy, no long lock, resumable.

:func:`migrate_to_partitioned` builds partitioned twins of ``transactions`` and ``changes``
(``transactions_partitioned``, ``changes_partitioned``, with a partition for every period the
data covers, the periods ahead and a DEFAULT partition), then copies the rows in id order, in
batches of ``batch_size``, one short transaction each, while the application keeps writing to the
old tables. It only copies rows of transactions that have ended (it waits for the transactions
running when it starts a round), so no row can appear later behind what it has copied. When
little is left, it takes the two tables' locks for one short transaction (under
``lock_timeout``, retried), copies the rest, and swaps the tables' names; the schema's functions
are then rebuilt for the new layout. The old tables are checked against the new ones (every row
copied) and dropped, unless ``keep_old``.

Interrupted at any point, it loses nothing (the old tables stay the store until the swap, and
the swap is one transaction); run it again and it continues from the last copied row. While it
runs, ``purge``, ``erase`` and baselines are refused: they rewrite or add rows behind the copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.core._run import forget
from threadline.core.busy import TABLES_BUSY
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.schema import check_partition_by, install_sql, require_installed
from threadline.ops.partition_copy import (
    copy_round,
    copy_statements,
    end_implicit_transaction,
    last_transaction_id,
    table_columns,
    wait_for_running,
)
from threadline.ops.partition_migration_state import MigrationError, migration_in_progress
from threadline.ops.partition_migration_state import (
    refuse_during_migration as refuse_during_migration,  # purge, erase and baselines import it from here
)
from threadline.ops.partition_swap import check_and_drop_old, old_tables_left, swap_tables
from threadline.ops.partition_twins import create_twins

__all__ = ["MigrationError", "MigrationResult", "migrate_to_partitioned", "migration_in_progress"]

logger = logging.getLogger("threadline.partitions")


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate_to_partitioned` did."""

    transactions: int
    """Transactions copied by this run (earlier, interrupted runs not counted)."""
    changes: int
    """Changes copied by this run."""
    partitions: int
    """Partitions of the new tables (both tables, DEFAULT partitions included)."""
    seconds: float
    switch_seconds: float
    """How long the final transaction held the tables' locks."""
    kept_old: bool
    """The old tables were kept (as ``transactions_plain`` and ``changes_plain``)."""


def migrate_to_partitioned(
    conn: psycopg.Connection[Any],
    *,
    partition_by: str = "month",
    ahead: int = 3,
    batch_size: int = 20_000,
    audit_schema: str = DEFAULT_SCHEMA,
    lock_timeout: float = 2.0,
    attempts: int = 20,
    keep_old: bool = False,
    progress: Callable[[str, int], None] | None = None,
    max_batches: int | None = None,
) -> MigrationResult:
    """Move a plain audit store to the partitioned layout, online (see the module's text).

    ``conn`` must not be in a transaction (each batch commits; an autocommit connection is
    simplest) and must be the audit schema's owner. ``progress(kind, rows)`` is called after each
    batch. ``max_batches`` stops after that many batches of the first round (for trying it out;
    a rerun continues).
    """
    check_schema_name(audit_schema)
    if check_partition_by(partition_by) is None:
        raise MigrationError("partition_by must name a period")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MigrationError(f"batch_size must be a positive integer, not {batch_size!r}")
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise MigrationError("migrate_to_partitioned() commits as it goes: call it with no open transaction")
    started = time.monotonic()
    with conn.transaction():
        require_installed(conn, audit_schema)
        kind = conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass(format('%%I.changes', %s::text))",
            [audit_schema],
        ).fetchone()
        running = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {}.baselines WHERE finished_at IS NULL AND ended_at IS NULL"
            ).format(sql.Identifier(audit_schema))
        ).fetchone()
    if kind and kind[0] == "p":
        if old_tables_left(conn, audit_schema) and not keep_old:
            # a run stopped between the switch and the check: finish it
            check_and_drop_old(conn, audit_schema, keep_old=False)
            end_implicit_transaction(conn)
            return MigrationResult(0, 0, 0, time.monotonic() - started, 0.0, False)
        raise MigrationError(f"the audit store of schema {audit_schema!r} is already partitioned")
    if running and running[0]:
        raise MigrationError("a baseline is being taken: let it finish (or end it) before moving the store")
    with conn.transaction():
        current = conn.execute(
            "SELECT to_regprocedure(format('%%I.partition_slot(text, timestamptz)', %s::text)) IS NOT NULL",
            [audit_schema],
        ).fetchone()
        if not (current and current[0]):  # installed by an earlier build of this version
            conn.execute(install_sql(audit_schema, partition_by=None).encode())
    create_twins(conn, audit_schema, partition_by, ahead)
    columns = table_columns(conn, audit_schema)
    statements = copy_statements(audit_schema, columns)
    copied_tx = copied_ch = 0
    limit = None if max_batches is None else max_batches * batch_size
    while True:
        upto = last_transaction_id(conn, audit_schema)
        end_implicit_transaction(conn)
        wait_for_running(conn)
        tx, ch = copy_round(
            conn,
            audit_schema,
            statements,
            batch_size if limit is None else min(batch_size, limit),
            upto,
            progress,
        )
        copied_tx, copied_ch = copied_tx + tx, copied_ch + ch
        if limit is not None:
            logger.info("stopped after max_batches: run again to continue")
            return MigrationResult(copied_tx, copied_ch, 0, time.monotonic() - started, 0.0, True)
        if tx + ch < batch_size:
            break
    switch_started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            switch_started = time.monotonic()
            tx, ch = swap_tables(conn, audit_schema, statements, lock_timeout)
            break
        except TABLES_BUSY:
            if attempt == attempts:
                raise
            logger.info("audit tables busy, retrying the switch (%d of %d)", attempt, attempts)
            time.sleep(min(0.1 * 2**attempt, 5.0))
            # catch up with what was written meanwhile
            upto = last_transaction_id(conn, audit_schema)
            end_implicit_transaction(conn)
            wait_for_running(conn)
            more = copy_round(conn, audit_schema, statements, batch_size, upto, progress)
            copied_tx, copied_ch = copied_tx + more[0], copied_ch + more[1]
    switch_seconds = time.monotonic() - switch_started
    forget(conn)
    copied_tx, copied_ch = copied_tx + tx, copied_ch + ch
    check_and_drop_old(conn, audit_schema, keep_old)
    count = conn.execute(
        sql.SQL("SELECT count(*) FROM {}.partitions()").format(sql.Identifier(audit_schema))
    ).fetchone()
    end_implicit_transaction(conn)
    seconds = time.monotonic() - started
    logger.info(
        "audit store partitioned: %d transactions and %d changes copied in %.1f s (tables locked %.3f s)",
        copied_tx,
        copied_ch,
        seconds,
        switch_seconds,
    )
    return MigrationResult(
        copied_tx, copied_ch, int(count[0]) if count else 0, seconds, switch_seconds, keep_old
    )
