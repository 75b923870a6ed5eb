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
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, pq, sql

from threadline.core._run import forget
from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.schema import check_partition_by, install_sql, layout_sql, require_installed

__all__ = ["MigrationError", "MigrationResult", "migrate_to_partitioned", "migration_in_progress"]

logger = logging.getLogger("threadline.partitions")

SUFFIX = "_partitioned"
OLD_SUFFIX = "_plain"
TABLES = ("transactions", "changes")


class MigrationError(ConfigurationError):
    """The store cannot be moved (or was not moved completely); the message says why."""


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


def migration_in_progress(conn: psycopg.Connection[Any], audit_schema: str = DEFAULT_SCHEMA) -> bool:
    """Whether a move to the partitioned layout has started and not finished."""
    check_schema_name(audit_schema)
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        [audit_schema, "transactions" + SUFFIX],
    ).fetchone()
    return bool(row and row[0])


def refuse_during_migration(conn: psycopg.Connection[Any], audit_schema: str, what: str) -> None:
    """Raise :class:`MigrationError` when a move to the partitioned layout is under way."""
    if migration_in_progress(conn, audit_schema):
        raise MigrationError(
            f"{what} is refused while the audit store of schema {audit_schema!r} is being moved to the "
            "partitioned layout: finish the move first (`threadline partitions --migrate`)"
        )


def _ident(audit_schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(audit_schema, name)


def _prepare(conn: psycopg.Connection[Any], audit_schema: str, period: str, ahead: int) -> None:
    """Create the partitioned twins, their indexes and partitions (once; a rerun finds them)."""
    a = sql.Identifier(audit_schema)
    if migration_in_progress(conn, audit_schema):
        return
    with conn.transaction():
        # erasures and purges check for the twins under this lock: none is half done now
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"threadline seal {audit_schema}"])
        for table in TABLES:
            new = _ident(audit_schema, table + SUFFIX)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {new} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING COMMENTS{extra})"
                    " PARTITION BY RANGE (occurred_at)"
                ).format(
                    new=new,
                    old=_ident(audit_schema, table),
                    extra=sql.SQL(
                        ", occurred_at timestamptz NOT NULL DEFAULT now()" if table == "changes" else ""
                    ),
                )
            )
            key = "transaction_id, id, occurred_at" if table == "changes" else "id, occurred_at"
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
                    new, sql.Identifier(table + SUFFIX + "_pkey"), sql.SQL(key)
                )
            )
            # the old table's other indexes, under temporary names
            for name, definition in conn.execute(
                "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass AND NOT i.indisprimary ORDER BY c.relname",
                [f'"{audit_schema}"."{table}"'],
            ).fetchall():
                target = _ident(audit_schema, table + SUFFIX).as_string(conn)
                rebuilt = re.sub(
                    r" ON (ONLY )?\S+ USING ", f" ON {target} USING ", definition, count=1
                ).replace(f"INDEX {name} ON", f"INDEX {name}{SUFFIX} ON", 1)
                if f"{name}{SUFFIX} ON {target} USING" not in rebuilt:
                    raise MigrationError(f"cannot rebuild index {name} of {table}: {definition}")
                conn.execute(rebuilt.encode())
        first = conn.execute(
            sql.SQL("SELECT least(min(occurred_at), now()) FROM {a}.transactions").format(a=a)
        ).fetchone()
        assert first is not None
        slots = conn.execute(
            sql.SQL(
                "WITH RECURSIVE s(lo, hi, n) AS ("
                "  SELECT (x).lo, (x).hi, 0 FROM (SELECT {a}.partition_slot(%(p)s, %(first)s) AS x) f"
                "  UNION ALL SELECT (y).lo, (y).hi, s.n + (CASE WHEN s.lo > now() THEN 1 ELSE 0 END)"
                "    FROM s, LATERAL (SELECT {a}.partition_slot(%(p)s, s.hi) AS y) z WHERE s.n < %(ahead)s)"
                " SELECT lo, hi FROM s ORDER BY lo"
            ).format(a=a),
            {"p": period, "first": first[0], "ahead": ahead},
        ).fetchall()
        for table in TABLES:
            parent = _ident(audit_schema, table + SUFFIX)
            for lo, hi in slots:
                named = conn.execute(
                    sql.SQL("SELECT {}.partition_name(%s, %s, %s)").format(a), [table, period, lo]
                ).fetchone()
                assert named is not None
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        _ident(audit_schema, named[0]),
                        parent,
                        sql.Literal(lo),
                        sql.Literal(hi),
                    )
                )
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
                    _ident(audit_schema, f"{table}_default"), parent
                )
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {a}.partitioning (period, ahead) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            ).format(a=a),
            [period, ahead],
        )
    logger.info("partitioned tables prepared: %d periods", len(slots))


def _wait_for_running(conn: psycopg.Connection[Any], timeout: float = 3600.0) -> None:
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


def _copy_statements(audit_schema: str, columns: dict[str, list[str]]) -> dict[str, sql.Composed]:
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


def _columns(conn: psycopg.Connection[Any], audit_schema: str) -> dict[str, list[str]]:
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


def _positions(conn: psycopg.Connection[Any], audit_schema: str) -> tuple[int, tuple[int, int]]:
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


def _copy_round(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    statements: dict[str, sql.Composed],
    batch_size: int,
    upto: int,
    progress: Callable[[str, int], None] | None,
) -> tuple[int, int]:
    """Copy every row of transactions up to id ``upto`` (all ended); returns (transactions, changes)."""
    done_tx, (after_tx, after) = _positions(conn, audit_schema)
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
    _idle(conn)
    return copied["transactions"], copied["changes"]


def _idle(conn: psycopg.Connection[Any]) -> None:
    """End the implicit transaction a plain statement opened (on a connection not in autocommit)."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        conn.commit()


def _last_id(conn: psycopg.Connection[Any], audit_schema: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT coalesce(max(id), 0) FROM {}.transactions").format(sql.Identifier(audit_schema))
    ).fetchone()
    return int(row[0]) if row else 0


def _switch(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    statements: dict[str, sql.Composed],
    lock_timeout: float,
) -> tuple[int, int]:
    """Copy the rest under the tables' locks and swap the names; returns rows copied."""
    a = sql.Identifier(audit_schema)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"])
        conn.execute(sql.SQL("LOCK TABLE {a}.transactions, {a}.changes IN ACCESS EXCLUSIVE MODE").format(a=a))
        conn.execute("SELECT set_config('lock_timeout', '0', true)")
        upto = _last_id(conn, audit_schema)
        copied = [0, 0]
        done_tx, (after_tx, after) = _positions(conn, audit_schema)
        for i, kind in enumerate(TABLES):
            row = conn.execute(
                statements[kind],
                {
                    "after": done_tx if kind == "transactions" else after,
                    "after_tx": after_tx,
                    "upto": upto,
                    "n": 2**62,
                },
            ).fetchone()
            copied[i] = int(row[0]) if row else 0
        for table in TABLES:
            old, new = table + OLD_SUFFIX, table + SUFFIX
            seq = conn.execute(
                "SELECT pg_get_serial_sequence(%s, 'id')", [f'"{audit_schema}"."{table}"']
            ).fetchone()
            last = conn.execute(f"SELECT last_value FROM {seq[0]}").fetchone() if seq and seq[0] else None
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN id RESTART WITH {}").format(
                    _ident(audit_schema, new), sql.Literal(int(last[0]) + 1 if last else 1)
                )
            )
            # the old table, its key and its indexes step aside under the _plain suffix
            conn.execute(
                sql.SQL("ALTER TABLE {}.{} RENAME TO {}").format(
                    a, sql.Identifier(table), sql.Identifier(old)
                )
            )
            for (index,) in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass",
                [f'"{audit_schema}"."{old}"'],
            ).fetchall():
                conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        _ident(audit_schema, index), sql.Identifier(index + OLD_SUFFIX)
                    )
                )
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    _ident(audit_schema, new), sql.Identifier(table)
                )
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                    _ident(audit_schema, table),
                    sql.Identifier(new + "_pkey"),
                    sql.Identifier(table + "_pkey"),
                )
            )
            for (index,) in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass",
                [f'"{audit_schema}"."{table}"'],
            ).fetchall():
                if index.endswith(SUFFIX):
                    conn.execute(
                        sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                            _ident(audit_schema, index), sql.Identifier(index[: -len(SUFFIX)])
                        )
                    )
            # the new table's privileges are the old one's
            for grantee, privilege in conn.execute(
                "SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type FROM pg_class c,"
                " aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee"
                " WHERE c.oid = %s::regclass AND a.grantee <> c.relowner",
                [f'"{audit_schema}"."{old}"'],
            ).fetchall():
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(privilege),
                        _ident(audit_schema, table),
                        sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
                    )
                )
            conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(_ident(audit_schema, old)))
        # the schema's functions and triggers that depend on the layout, rebuilt for partitions
        # (the rest of the install script would lock the tracked tables: not while holding these)
        conn.execute(layout_sql(audit_schema).encode())
    return copied[0], copied[1]


def _check_and_drop(conn: psycopg.Connection[Any], audit_schema: str, keep_old: bool) -> None:
    """Check that every old row has its copy (by count, up to the last old id), then drop the old tables."""
    a = sql.Identifier(audit_schema)
    for table in TABLES:
        old = _ident(audit_schema, table + OLD_SUFFIX)
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {old}),"
                " (SELECT count(*) FROM {a}.{t} WHERE id <= (SELECT coalesce(max(id), 0) FROM {old}))"
            ).format(old=old, a=a, t=sql.Identifier(table))
        ).fetchone()
        assert row is not None
        if row[0] > row[1]:
            raise MigrationError(
                f"{table}: {row[0]} rows in the old table but {row[1]} copied; the old table is kept as "
                f"{audit_schema}.{table}{OLD_SUFFIX} and nothing was dropped"
            )
    if keep_old:
        return
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {a}.transaction_digest({old})").format(
                    a=a, old=_ident(audit_schema, "transactions" + OLD_SUFFIX)
                )
            )
            conn.execute(
                sql.SQL("DROP TABLE {}, {}").format(
                    _ident(audit_schema, "changes" + OLD_SUFFIX),
                    _ident(audit_schema, "transactions" + OLD_SUFFIX),
                )
            )
    except errors.DependentObjectsStillExist as exc:
        raise MigrationError(
            f"the store is partitioned and every row was copied, but the old tables {audit_schema}.changes"
            f"{OLD_SUFFIX} and {audit_schema}.transactions{OLD_SUFFIX} were kept: {exc.diag.message_detail or exc}."
            " Move what depends on them to the new tables, then drop them (DROP TABLE ...)"
        ) from exc


def _old_tables_left(conn: psycopg.Connection[Any], audit_schema: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        [audit_schema, "transactions" + OLD_SUFFIX],
    ).fetchone()
    return bool(row and row[0])


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
        if _old_tables_left(conn, audit_schema) and not keep_old:
            # a run stopped between the switch and the check: finish it
            _check_and_drop(conn, audit_schema, keep_old=False)
            _idle(conn)
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
    _prepare(conn, audit_schema, partition_by, ahead)
    columns = _columns(conn, audit_schema)
    statements = _copy_statements(audit_schema, columns)
    copied_tx = copied_ch = 0
    limit = None if max_batches is None else max_batches * batch_size
    while True:
        upto = _last_id(conn, audit_schema)
        _idle(conn)
        _wait_for_running(conn)
        tx, ch = _copy_round(
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
            tx, ch = _switch(conn, audit_schema, statements, lock_timeout)
            break
        except errors.LockNotAvailable:
            if attempt == attempts:
                raise
            logger.info("audit tables busy, retrying the switch (%d of %d)", attempt, attempts)
            time.sleep(min(0.1 * 2**attempt, 5.0))
            # catch up with what was written meanwhile
            upto = _last_id(conn, audit_schema)
            _idle(conn)
            _wait_for_running(conn)
            more = _copy_round(conn, audit_schema, statements, batch_size, upto, progress)
            copied_tx, copied_ch = copied_tx + more[0], copied_ch + more[1]
    switch_seconds = time.monotonic() - switch_started
    forget(conn)
    copied_tx, copied_ch = copied_tx + tx, copied_ch + ch
    _check_and_drop(conn, audit_schema, keep_old)
    count = conn.execute(
        sql.SQL("SELECT count(*) FROM {}.partitions()").format(sql.Identifier(audit_schema))
    ).fetchone()
    _idle(conn)
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
