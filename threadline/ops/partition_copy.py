"""Copy the audit rows into the partitioned twins in id order, in short batches, only rows of
transactions that have ended; where the copy stands is read back from the twins, so a rerun
continues from the last row copied."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.ops.partition_migration_state import TABLES, MigrationError


def wait_for_running(conn: psycopg.Connection[Any], timeout: float = 3600.0) -> None:
    """Wait until every transaction running now in this database (in any session but this one)
    has ended: rows of the audit tables with ids allocated before now are then all final."""
    with conn.transaction():
        running = [
            r[0]
            for r in conn.execute(
                "SELECT l.virtualtransaction FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'virtualxid' AND l.granted AND a.datname = current_database()"
                " AND l.pid <> pg_backend_pid()"
            ).fetchall()
        ]
    deadline = time.monotonic() + timeout
    while running:
        with conn.transaction():
            row = conn.execute(
                "SELECT array_agg(virtualtransaction) FROM pg_locks WHERE locktype = 'virtualxid' AND granted"
                " AND virtualtransaction = ANY (%s)",
                [running],
            ).fetchone()
        running = list(row[0] or []) if row else []
        if running:
            if time.monotonic() > deadline:
                raise MigrationError(f"transactions {running} have been running for over {timeout:.0f} s")
            time.sleep(0.05)


def copy_statements(audit_schema: str, columns: dict[str, list[str]]) -> dict[str, sql.Composed]:
    """The statement copying one batch of each table into its twin, after a position and up to a
    transaction id; each returns the rows copied and the key of the last one."""
    a = sql.Identifier(audit_schema)
    tx_cols = sql.SQL(", ").join(map(sql.Identifier, columns["transactions"]))
    ch_cols = sql.SQL(", ").join(map(sql.Identifier, columns["changes"]))
    ch_src = sql.SQL(", ").join(sql.Identifier("c", n) for n in columns["changes"])
    return {
        "transactions": sql.SQL(
            "WITH batch AS (SELECT * FROM {a}.transactions WHERE id > %(after)s AND id <= %(upto)s"
            " ORDER BY id LIMIT %(n)s),"
            " copied AS (INSERT INTO {a}.transactions_partitioned ({cols}) OVERRIDING SYSTEM VALUE"
            "            SELECT {cols} FROM batch RETURNING id)"
            " SELECT count(*), max(id), NULL::bigint FROM copied"
        ).format(a=a, cols=tx_cols),
        # a change takes its transaction's start time (its capture time if that row is gone)
        "changes": sql.SQL(
            "WITH batch AS (SELECT * FROM {a}.changes WHERE (transaction_id, id) > (%(after_tx)s, %(after)s)"
            " AND transaction_id <= %(upto)s ORDER BY transaction_id, id LIMIT %(n)s),"
            " copied AS (INSERT INTO {a}.changes_partitioned ({cols}, occurred_at) OVERRIDING SYSTEM VALUE"
            "            SELECT {src}, coalesce(t.occurred_at, c.captured_at) FROM batch c"
            "              LEFT JOIN {a}.transactions t ON t.id = c.transaction_id"
            "            RETURNING transaction_id, id)"
            " SELECT count(*), (array_agg(transaction_id ORDER BY transaction_id DESC, id DESC))[1],"
            " (array_agg(id ORDER BY transaction_id DESC, id DESC))[1] FROM copied"
        ).format(a=a, cols=ch_cols, src=ch_src),
    }


def table_columns(conn: psycopg.Connection[Any], audit_schema: str) -> dict[str, list[str]]:
    """The columns of each audit table, in their order."""
    out = {}
    for table in TABLES:
        out[table] = [
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " AND NOT attisdropped ORDER BY attnum",
                [f'"{audit_schema}"."{table}"'],
            ).fetchall()
        ]
    return out


def copy_positions(conn: psycopg.Connection[Any], audit_schema: str) -> tuple[int, tuple[int, int]]:
    """Where the copy stands: the last transaction id copied, the last change key copied."""
    a = sql.Identifier(audit_schema)
    row = conn.execute(
        sql.SQL(
            "SELECT coalesce((SELECT max(id) FROM {a}.transactions_partitioned), 0),"
            " (SELECT ARRAY[transaction_id, id] FROM {a}.changes_partitioned"
            "   ORDER BY transaction_id DESC, id DESC LIMIT 1)"
        ).format(a=a)
    ).fetchone()
    assert row is not None
    last = row[1] or [0, 0]
    return int(row[0]), (int(last[0]), int(last[1]))


def copy_round(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    statements: dict[str, sql.Composed],
    batch_size: int,
    upto: int,
    progress: Callable[[str, int], None] | None,
) -> tuple[int, int]:
    """Copy every row of transactions up to id ``upto`` (all ended); returns (transactions, changes)."""
    done_tx, (after_tx, after) = copy_positions(conn, audit_schema)
    copied = {"transactions": 0, "changes": 0}
    for kind in TABLES:
        while True:
            with conn.transaction():
                row = conn.execute(
                    statements[kind],
                    {
                        "after": done_tx if kind == "transactions" else after,
                        "after_tx": after_tx,
                        "upto": upto,
                        "n": batch_size,
                    },
                ).fetchone()
            count = int(row[0]) if row else 0
            copied[kind] += count
            if progress is not None and count:
                progress(kind, copied[kind])
            if count < batch_size:
                break
            assert row is not None
            if kind == "transactions":
                done_tx = int(row[1])
            else:
                after_tx, after = int(row[1]), int(row[2])
    end_implicit_transaction(conn)
    return copied["transactions"], copied["changes"]


def end_implicit_transaction(conn: psycopg.Connection[Any]) -> None:
    """End the implicit transaction a plain statement opened (on a connection not in autocommit)."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        conn.commit()


def last_transaction_id(conn: psycopg.Connection[Any], audit_schema: str) -> int:
    """The highest transaction id in the old ``transactions`` table (0 when empty)."""
    row = conn.execute(
        sql.SQL("SELECT coalesce(max(id), 0) FROM {}.transactions").format(sql.Identifier(audit_schema))
    ).fetchone()
    return int(row[0]) if row else 0
