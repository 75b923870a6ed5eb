"""Partitioning benchmark: what a time-partitioned audit store costs and saves, against the
current (unpartitioned) one, in one run.

Run with ``python bench/partitioning.py``. Builds two scratch databases: one with the audit
schema as installed, one where ``changes`` is range-partitioned by ``captured_at`` and
``transactions`` by ``occurred_at`` (same columns, defaults and indexes; primary keys widened to
``(transaction_id, id, captured_at)`` and ``(id, occurred_at)``), monthly, 24 partitions from 12
months back plus a DEFAULT partition. Then it measures, printing Markdown:

- that capture works on both (rows of a tracked table's inserts, updates and deletes land in the
  current month's partitions, one transaction row per transaction) and that capture's lookup of
  the transaction row (``t.xid = pg_current_xact_id() AND t.occurred_at = now()``) prunes to one
  partition under a generic plan, as in the capture functions;
- capture cost: single-row INSERT and UPDATE transactions of a tracked 8-column table with
  pgbench (1 client, PART_SECONDS per run, PART_ROUNDS rounds in alternating order, median TPS),
  and one statement inserting / updating 10,000 rows (median of 5);
- retention: both stores filled with PART_CHANGES changes (10 per transaction) spread evenly over
  the last 12 months, written directly with generate_series in capture order (the fill's time is
  reported), then everything older than 6 months purged: the unpartitioned store with the batched
  DELETEs of ``threadline/retention.py`` (PART_BATCH rows, each batch its own transaction), the
  partitioned one by dropping the partitions wholly older than the cut-off, then the same batched
  DELETEs with the partition key added, on what is left (the partition the cut-off falls in);
  one batch of ``retention.purge`` as it is runs first there, to show its cost. Time, WAL
  written (``pg_current_wal_lsn()`` difference, after a CHECKPOINT; the WAL position is the
  cluster's, so other activity on the server adds to it) and the audit tables' size after, and
  after a plain VACUUM;
- read plans on the filled stores (EXPLAIN ANALYZE, BUFFERS) of the library's queries: the changes
  of one transaction, the history of one row (hash index on ``pk``), the trace of a correlation id
  (its transactions, then their changes), a time-bounded read, link_action()'s update of a
  transaction row by id; with the partitions each touches; and, after the purge, one seal batch
  (``threadline.seal(1000)``), which reads changes by transaction;
- the locks partition maintenance takes on the parent and the DEFAULT partition (create, attach,
  detach, drop), and what a DEFAULT partition holding rows of a month does to creating that month.

Environment: THREADLINE_DSN (server), PART_CHANGES (default 10,000,000), PART_SECONDS (10),
PART_ROUNDS (4), PART_BATCH (10,000), PART_STEP_TIMEOUT (statement timeout of each fill or purge
statement, seconds; default 1800).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench._db import scratch_database  # noqa: E402
from threadline import ddl, retention  # noqa: E402
from threadline.query import CHANGE_COLUMNS, TRANSACTION_COLUMNS  # noqa: E402

CHANGES = int(os.environ.get("PART_CHANGES", "10000000"))
SECONDS = int(os.environ.get("PART_SECONDS", "10"))
ROUNDS = int(os.environ.get("PART_ROUNDS", "4"))
BATCH = int(os.environ.get("PART_BATCH", "10000"))
STEP_TIMEOUT = int(os.environ.get("PART_STEP_TIMEOUT", "1800"))
PER_TX = 10
MONTHS_BACK = 12
PARTITIONS = 24
KEEP = "6 months"
BULK_ROWS = 10_000
BULK_RUNS = 5
TABLE_ROWS = 100_000
ROW_KEYS = 200_000  # distinct row keys of the filled changes: each row changes ~50 times a year

STORES = ("unpartitioned", "partitioned")
CONTEXT = '{"actor":{"id":"42","type":"user"},"correlation_id":"bench","v":1}'

# (table, partition key, primary key of the partitioned table)
PARTITIONED = (
    ("changes", "captured_at", "transaction_id, id, captured_at"),
    ("transactions", "occurred_at", "id, occurred_at"),
)


# ---------------------------------------------------------------------------------------------
# building the stores


def partition_store(conn: psycopg.Connection) -> list[tuple[str, datetime, datetime]]:
    """Turn the freshly installed (empty) audit tables into partitioned tables; returns the
    monthly partitions as (suffix, from, to).

    Each table is renamed, recreated as a partitioned table LIKE it (columns, defaults, identity,
    comments, storage), given the old table's indexes under their names (the primary key widened
    by the partition key) and its partitions; the old table is dropped. Dropping it drops what
    depended on its row type (transaction_digest()) and its refresh_context trigger, so the
    install script is applied once more (it is idempotent) to restore them on the new tables.
    """
    with conn.transaction():
        months = conn.execute(
            "SELECT to_char(m, '\"y\"YYYY\"m\"MM'), m, m + interval '1 month'"
            " FROM generate_series(date_trunc('month', now()) - %s * interval '1 month',"
            "                      date_trunc('month', now()) + %s * interval '1 month', interval '1 month') m",
            [MONTHS_BACK, PARTITIONS - MONTHS_BACK - 1],
        ).fetchall()
        for table, key, pk in PARTITIONED:
            old = f"{table}_unpartitioned"
            conn.execute(f"ALTER TABLE threadline.{table} RENAME TO {old}")
            conn.execute(
                f"CREATE TABLE threadline.{table} (LIKE threadline.{old} INCLUDING ALL EXCLUDING INDEXES)"
                f" PARTITION BY RANGE ({key})"
            )
            indexes = conn.execute(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i"
                " WHERE i.indrelid = %s::regclass AND NOT i.indisprimary ORDER BY i.indexrelid",
                [f"threadline.{old}"],
            ).fetchall()
            conn.execute(f"DROP TABLE threadline.{old} CASCADE")
            conn.execute(f"ALTER TABLE threadline.{table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({pk})")
            for (definition,) in indexes:
                conn.execute(definition.replace(f" ON threadline.{old} ", f" ON threadline.{table} "))
            for suffix, lo, hi in months:
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier("threadline", f"{table}_{suffix}"),
                        sql.Identifier("threadline", table),
                        sql.Literal(lo),
                        sql.Literal(hi),
                    )
                )
            conn.execute(f"CREATE TABLE threadline.{table}_default PARTITION OF threadline.{table} DEFAULT")
        conn.execute(ddl.install_sql().encode())
    return [(s, lo, hi) for s, lo, hi in months]


SHAPE_SQL = """
SELECT c.relname, c.relkind::text,
       (SELECT json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                         a.attidentity, pg_get_expr(d.adbin, d.adrelid)) ORDER BY a.attnum)
          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::text AS columns,
       (SELECT json_agg(json_build_array(ic.relname, regexp_replace(pg_get_indexdef(i.indexrelid),
                        ' ON (ONLY )?\\S+', ' ON t')) ORDER BY ic.relname)
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid)::text AS indexes,
       (SELECT json_agg(tgname ORDER BY tgname) FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal)::text
  FROM pg_class c
 WHERE c.oid IN ('threadline.changes'::regclass, 'threadline.transactions'::regclass)
 ORDER BY c.relname
"""


def shape_differences(plain: psycopg.Connection, parted: psycopg.Connection) -> list[str]:
    """How the two stores' audit tables differ (columns, defaults, identity, indexes, triggers)."""
    out = []
    for a, b in zip(plain.execute(SHAPE_SQL).fetchall(), parted.execute(SHAPE_SQL).fetchall(), strict=True):
        name = a[0]
        if a[2] != b[2]:
            out.append(f"{name}: columns differ")
        ia, ib = dict(json.loads(a[3])), dict(json.loads(b[3]))
        for index in sorted(set(ia) | set(ib)):
            if ia.get(index) != ib.get(index):
                out.append(f"{name}.{index}: `{ia.get(index)}` → `{ib.get(index)}`")
        if a[4] != b[4]:
            out.append(f"{name}: triggers {a[4]} → {b[4]}")
    return out


APP_TABLE = (
    "CREATE SCHEMA app;"
    " CREATE TABLE app.t8 (id bigint PRIMARY KEY, a int, b text, c text, d int, e timestamptz, f bool, g numeric);"
    " INSERT INTO app.t8 SELECT g, g, 'x' || g, 'y', g, now(), true, g FROM generate_series(1, {n}) g;"
)


def verify_capture(conn: psycopg.Connection) -> str:
    """Insert, update and delete through the tracked table in two transactions; check where the
    audit rows landed. Returns a one-line summary (raises when something is off)."""
    tx_ids = []
    for statements in (
        [
            "INSERT INTO app.t8 VALUES (-1, 1, 'a', 'b', 1, now(), true, 1), (-2, 2, 'a', 'b', 2, now(), true, 2),"
            " (-3, 3, 'a', 'b', 3, now(), true, 3)",
            "UPDATE app.t8 SET a = a + 10 WHERE id IN (-1, -2)",
            "DELETE FROM app.t8 WHERE id = -3",
        ],
        ["UPDATE app.t8 SET b = 'changed' WHERE id = -1", "DELETE FROM app.t8 WHERE id IN (-1, -2)"],
    ):
        with conn.transaction():
            conn.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT])
            for statement in statements:
                conn.execute(statement)
            row = conn.execute("SELECT threadline.current_row(), now()").fetchone()
            assert row is not None and row[0] is not None, "no transaction row for the writing transaction"
            tx_ids.append(row[0])
    rows = conn.execute(
        "SELECT c.transaction_id, c.tableoid::regclass::text, c.op, count(*),"
        "       bool_and(c.captured_at >= t.occurred_at)"
        "  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id"
        " WHERE c.transaction_id = ANY (%s) GROUP BY 1, 2, 3 ORDER BY 1, 3",
        [tx_ids],
    ).fetchall()
    txs = conn.execute(
        "SELECT t.id, t.tableoid::regclass::text, t.correlation_id FROM threadline.transactions t"
        " WHERE t.id = ANY (%s) ORDER BY t.id",
        [tx_ids],
    ).fetchall()
    counts = {(r[0], r[2]): r[3] for r in rows}
    expected = {
        (tx_ids[0], "insert"): 3,
        (tx_ids[0], "update"): 2,
        (tx_ids[0], "delete"): 1,
        (tx_ids[1], "update"): 1,
        (tx_ids[1], "delete"): 2,
    }
    if counts != expected or len(txs) != 2 or not all(r[4] for r in rows):
        raise RuntimeError(f"capture check failed: changes {rows}, transactions {txs}")
    if any(t[2] != "bench" for t in txs):
        raise RuntimeError(f"context not recorded: {txs}")
    change_tables = sorted({r[1] for r in rows})
    tx_tables = sorted({t[1] for t in txs})
    if any(name.endswith("_default") for name in change_tables + tx_tables):
        raise RuntimeError(f"audit rows went to a DEFAULT partition: {change_tables} {tx_tables}")
    conn.execute("DELETE FROM threadline.changes WHERE transaction_id = ANY (%s)", [tx_ids])
    conn.execute("DELETE FROM threadline.transactions WHERE id = ANY (%s)", [tx_ids])
    return f"ok: 9 changes in {', '.join(change_tables)}; 2 transaction rows in {', '.join(tx_tables)}"


LOOKUP = (
    "SELECT t.id FROM threadline.transactions AS t"
    " WHERE t.xid = pg_current_xact_id() AND t.occurred_at = now() ORDER BY t.xid, t.id LIMIT 1"
)


def lookup_plan(conn: psycopg.Connection) -> str:
    """The capture code's lookup of the transaction row, as a generic plan (how PL/pgSQL runs it
    once cached), in a transaction that has a row."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute("UPDATE app.t8 SET a = a + 1 WHERE id = 1")
        conn.execute(f"PREPARE lookup AS {LOOKUP}")
        plan = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE lookup").fetchall()
        conn.execute("DEALLOCATE lookup")
    return "\n".join(r[0] for r in plan)


# ---------------------------------------------------------------------------------------------
# capture cost

PGBENCH = {
    "single-row INSERT": (
        "\\set id random(1000000000, 9000000000)\n"
        "BEGIN;\nSET LOCAL threadline.context = '" + CONTEXT + "';\n"
        "INSERT INTO app.t8 VALUES (:id, 1, 'x', 'y', 1, now(), true, 1) ON CONFLICT DO NOTHING;\nEND;\n"
    ),
    "single-row UPDATE": (
        "\\set id random(1, " + str(TABLE_ROWS) + ")\n"
        "BEGIN;\nSET LOCAL threadline.context = '" + CONTEXT + "';\n"
        "UPDATE app.t8 SET a = a + 1 WHERE id = :id;\nEND;\n"
    ),
}


def pgbench_tps(dsn: str, script: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["pgbench", "-n", "-c", "1", "-T", str(SECONDS), "-f", f.name, dsn],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        Path(f.name).unlink()
    match = re.search(r"tps = ([0-9.]+)", out)
    if not match:
        raise RuntimeError(f"cannot read pgbench output:\n{out}")
    return float(match.group(1))


BULK = {
    "INSERT": (
        f"INSERT INTO app.t8 SELECT g, g, 'x', 'y', g, now(), true, g FROM generate_series(1000001, {1000000 + BULK_ROWS}) g",
        "DELETE FROM app.t8 WHERE id > 1000000",
    ),
    "UPDATE": (f"UPDATE app.t8 SET a = a + 1, c = 'z' || a WHERE id <= {BULK_ROWS}", None),
}


def bulk_ms(conn: psycopg.Connection, op: str) -> float:
    statement, cleanup = BULK[op]
    start = time.perf_counter()
    with conn.transaction():
        conn.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT])
        conn.execute(statement)
    elapsed = (time.perf_counter() - start) * 1000
    if cleanup:
        conn.execute(cleanup)
    return elapsed


# ---------------------------------------------------------------------------------------------
# retention

FILL_TRANSACTIONS = """
INSERT INTO threadline.transactions (xid, occurred_at, actor, correlation_id, request_id, origin)
SELECT (1000 + g)::text::xid8, %(start)s::timestamptz + (%(end)s::timestamptz - %(start)s::timestamptz) * ((g - 1)::float8 / %(n)s),
       jsonb_build_object('type', 'user', 'id', (g %% 1000)::text), 'req-' || (g / 3), 'r-' || g, 'web'
  FROM generate_series(1, %(n)s) g
"""
FILL_CHANGES = """
INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, after, before, captured_at)
SELECT t.id, 'app', 'items', CASE WHEN k = 1 THEN 'insert' ELSE 'update' END, jsonb_build_object('id', r.id),
       json_build_object('id', r.id, 'name', 'item ' || r.id, 'qty', k, 'price', t.id %% 1000),
       CASE WHEN k > 1 THEN json_build_object('id', r.id, 'name', 'item ' || r.id, 'qty', k - 1, 'price', t.id %% 1000) END,
       t.occurred_at + k * interval '1 millisecond'
  FROM threadline.transactions t CROSS JOIN generate_series(1, %(per_tx)s) k
 CROSS JOIN LATERAL (SELECT (t.id * %(per_tx)s + k) %% %(keys)s AS id) r
 WHERE t.id >= %(lo)s AND t.id < %(hi)s
 ORDER BY t.id, k
"""


def fill(conn: psycopg.Connection, start: datetime, end: datetime) -> tuple[float, float]:
    """Write CHANGES changes in CHANGES / PER_TX transactions spread from start to end; returns
    (seconds of the INSERTs, seconds of the VACUUM ANALYZE after)."""
    txs = CHANGES // PER_TX
    t0 = time.monotonic()
    with conn.transaction():
        # the deferred refresh_context trigger is the capture path's; a bulk load skips it
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(FILL_TRANSACTIONS, {"start": start, "end": end, "n": txs})
    row = conn.execute("SELECT min(id), max(id) FROM threadline.transactions").fetchone()
    assert row is not None
    lo, hi = row
    step = 100_000
    for first in range(lo, hi + 1, step):
        with conn.transaction():
            conn.execute(
                FILL_CHANGES,
                {"per_tx": PER_TX, "keys": ROW_KEYS, "lo": first, "hi": min(first + step, hi + 1)},
            )
    filled = time.monotonic() - t0
    t0 = time.monotonic()
    conn.execute("VACUUM ANALYZE threadline.changes, threadline.transactions")
    return filled, time.monotonic() - t0


def audit_size(conn: psycopg.Connection) -> int:
    """Bytes of changes and transactions with their indexes and TOAST (every partition)."""
    row = conn.execute(
        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
        " WHERE c.oid IN ('threadline.changes'::regclass, 'threadline.transactions'::regclass)"
        "    OR c.oid IN (SELECT p.relid FROM pg_partition_tree('threadline.changes') p"
        "                 UNION ALL SELECT p.relid FROM pg_partition_tree('threadline.transactions') p)"
    ).fetchone()
    assert row is not None
    return int(row[0])


def wal_lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_since(conn: psycopg.Connection, lsn: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", [lsn]).fetchone()
    assert row is not None
    return int(row[0])


def counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(changes, transactions, changes whose transaction row is gone)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM threadline.changes), (SELECT count(*) FROM threadline.transactions),"
        " (SELECT count(*) FROM threadline.changes c"
        "   WHERE NOT EXISTS (SELECT 1 FROM threadline.transactions t WHERE t.id = c.transaction_id))"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# The batched DELETEs of threadline/retention.py (keyset over the primary key, each batch its own
# transaction): changes captured before the cut-off, then transactions before it left with no
# changes. With ``pruned``, each DELETE also names the partition key (and the batch carries it), so
# the DELETE reads only the partitions before the cut-off.
PURGE_CHANGES = """
WITH batch AS (SELECT transaction_id, id, captured_at FROM threadline.changes
                WHERE (transaction_id, id) > (%(after_tx)s, %(after)s) AND captured_at < %(cutoff)s
                ORDER BY transaction_id, id LIMIT %(n)s),
     gone AS (DELETE FROM threadline.changes c USING batch b
               WHERE c.transaction_id = b.transaction_id AND c.id = b.id{pruned}
              RETURNING c.transaction_id, c.id)
SELECT count(*), (array_agg(transaction_id ORDER BY transaction_id DESC, id DESC))[1],
       (array_agg(id ORDER BY transaction_id DESC, id DESC))[1] FROM gone
"""
PURGE_TRANSACTIONS = """
WITH batch AS (SELECT t.id, t.occurred_at FROM threadline.transactions t
                WHERE t.id > %(after)s AND t.occurred_at < %(cutoff)s
                  AND NOT EXISTS (SELECT 1 FROM threadline.changes c WHERE c.transaction_id = t.id)
                ORDER BY t.id LIMIT %(n)s),
     gone AS (DELETE FROM threadline.transactions t USING batch b WHERE t.id = b.id{pruned} RETURNING t.id)
SELECT count(*), NULL::bigint, max(id) FROM gone
"""


def batched_purge(conn: psycopg.Connection, cutoff: datetime, pruned: bool) -> tuple[int, int, int, float]:
    """(changes, transactions, batches, seconds) of retention.py's batched DELETEs."""
    statements = (
        PURGE_CHANGES.format(
            pruned=" AND c.captured_at = b.captured_at AND c.captured_at < %(cutoff)s" if pruned else ""
        ),
        PURGE_TRANSACTIONS.format(
            pruned=" AND t.occurred_at = b.occurred_at AND t.occurred_at < %(cutoff)s" if pruned else ""
        ),
    )
    totals = [0, 0]
    batches = 0
    t0 = time.monotonic()
    for kind, statement in enumerate(statements):
        after_tx, after = 0, 0
        while True:
            with conn.transaction():
                row = conn.execute(
                    statement, {"cutoff": cutoff, "after_tx": after_tx, "after": after, "n": BATCH}
                ).fetchone()
            batches += 1
            deleted, last_tx, last = (row[0], row[1], row[2]) if row else (0, None, None)
            totals[kind] += deleted
            if deleted < BATCH or last is None:
                break
            after_tx, after = last_tx or 0, last
    return totals[0], totals[1], batches, time.monotonic() - t0


def purge_unpartitioned(conn: psycopg.Connection, cutoff: datetime) -> dict[str, Any]:
    conn.execute("CHECKPOINT")
    before = audit_size(conn)
    lsn = wal_lsn(conn)
    changes, transactions, batches, seconds = batched_purge(conn, cutoff, pruned=False)
    wal = wal_since(conn, lsn)
    after = audit_size(conn)
    lsn = wal_lsn(conn)
    t0 = time.monotonic()
    conn.execute("VACUUM threadline.changes, threadline.transactions")
    vacuum_s = time.monotonic() - t0
    return {
        "seconds": seconds,
        "wal": wal,
        "deleted": (changes, transactions, batches),
        "size_before": before,
        "size_after": after,
        "vacuum_s": vacuum_s,
        "vacuum_wal": wal_since(conn, lsn),
        "size_vacuumed": audit_size(conn),
    }


def purge_partitioned(
    conn: psycopg.Connection, cutoff: datetime, months: list[tuple[str, datetime, datetime]]
) -> dict[str, Any]:
    conn.execute("CHECKPOINT")
    before = audit_size(conn)
    lsn = wal_lsn(conn)
    t0 = time.monotonic()
    doomed = [suffix for suffix, _lo, hi in months if hi <= cutoff]
    for suffix in doomed:
        for table, _key, _pk in PARTITIONED:
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '5s'")
                conn.execute(f"DROP TABLE threadline.{table}_{suffix}")
    drop_s = time.monotonic() - t0
    drop_wal = wal_since(conn, lsn)
    # one batch of the library's purge as it is: its DELETE names no partition key
    lsn2 = wal_lsn(conn)
    probe = retention.purge(conn, cutoff, batch_size=BATCH, max_batches=1)
    probe_wal = wal_since(conn, lsn2)
    lsn2 = wal_lsn(conn)
    changes, transactions, batches, edge_s = batched_purge(conn, cutoff, pruned=True)
    edge_wal = wal_since(conn, lsn2)
    after = audit_size(conn)
    edge = next(suffix for suffix, lo, hi in months if lo <= cutoff < hi)
    lsn = wal_lsn(conn)
    t1 = time.monotonic()
    conn.execute(f"VACUUM threadline.changes_{edge}, threadline.transactions_{edge}")
    vacuum_s = time.monotonic() - t1
    return {
        "seconds": drop_s + probe.seconds + edge_s,
        "drop_s": drop_s,
        "probe_s": probe.seconds,
        "probe_rows": probe.changes,
        "edge_s": edge_s,
        "wal": drop_wal + probe_wal + edge_wal,
        "drop_wal": drop_wal,
        "edge_wal": probe_wal + edge_wal,
        "dropped": len(doomed),
        "edge": edge,
        "deleted": (probe.changes + changes, probe.transactions + transactions, probe.batches + batches),
        "size_before": before,
        "size_after": after,
        "vacuum_s": vacuum_s,
        "vacuum_wal": wal_since(conn, lsn),
        "size_vacuumed": audit_size(conn),
    }


# ---------------------------------------------------------------------------------------------
# read plans

_SELECT = sql.SQL(
    "SELECT {c} FROM threadline.changes c LEFT JOIN threadline.transactions t ON t.id = c.transaction_id"
).format(c=CHANGE_COLUMNS)


def plan_queries(sample: dict[str, Any]) -> list[tuple[str, str, sql.Composable, dict[str, Any]]]:
    """(key, what, statement, params): the library's read statements, and variants that give the
    planner a bound on the partition key."""
    trace_changes = sql.SQL(
        "SELECT {c}, t.id AS t_id FROM threadline.transactions t JOIN threadline.changes c"
        " ON c.transaction_id = t.id WHERE t.correlation_id = %(cid)s{extra} ORDER BY c.transaction_id, c.id"
    )
    return [
        (
            "tx",
            "changes of one transaction (changes_for_transaction)",
            _SELECT + sql.SQL(" WHERE c.transaction_id = %(tid)s ORDER BY c.id"),
            {"tid": sample["tid"]},
        ),
        (
            "tx-bounded",
            "… with `c.captured_at >= <the transaction's occurred_at>` added",
            _SELECT + sql.SQL(" WHERE c.transaction_id = %(tid)s AND c.captured_at >= %(at)s ORDER BY c.id"),
            {"tid": sample["tid"], "at": sample["at"]},
        ),
        (
            "tx-row",
            "its transaction row (with_transactions: `t.id = ANY (...)`)",
            sql.SQL("SELECT {} FROM threadline.transactions t WHERE t.id = ANY (%(ids)s::bigint[])").format(
                TRANSACTION_COLUMNS
            ),
            {"ids": [sample["tid"]]},
        ),
        (
            "link-action",
            "link_action()'s UPDATE of the transaction row by id (write path)",
            sql.SQL(
                "UPDATE threadline.transactions SET action_id = 1 WHERE id = %(tid)s AND action_id IS NULL"
            ),
            {"tid": sample["tid"]},
        ),
        (
            "link-action-bounded",
            "… with `occurred_at = now()` (here: the row's occurred_at) added",
            sql.SQL(
                "UPDATE threadline.transactions SET action_id = 1"
                " WHERE id = %(tid)s AND occurred_at = %(at)s AND action_id IS NULL"
            ),
            {"tid": sample["tid"], "at": sample["at"]},
        ),
        (
            "history",
            "history of one row by pk (hash index), ~50 changes over 12 months",
            _SELECT
            + sql.SQL(
                " WHERE c.pk = %(pk)s AND c.table_schema = 'app' AND c.table_name = 'items'"
                " ORDER BY c.captured_at DESC, c.id DESC"
            ),
            {"pk": psycopg.types.json.Jsonb({"id": sample["row"]})},
        ),
        (
            "trace-tx",
            "trace: transactions of a correlation id",
            sql.SQL(
                "SELECT {} FROM threadline.transactions t WHERE t.correlation_id = %(cid)s ORDER BY t.occurred_at, t.id"
            ).format(TRANSACTION_COLUMNS),
            {"cid": sample["cid"]},
        ),
        (
            "trace-changes",
            "trace: their changes (join on transaction_id)",
            trace_changes.format(c=CHANGE_COLUMNS, extra=sql.SQL("")),
            {"cid": sample["cid"]},
        ),
        (
            "trace-changes-bounded",
            "… with `c.captured_at >= t.occurred_at` added (run-time pruning)",
            trace_changes.format(c=CHANGE_COLUMNS, extra=sql.SQL(" AND c.captured_at >= t.occurred_at")),
            {"cid": sample["cid"]},
        ),
        (
            "window-count",
            "count of changes captured in a 10-day window across a month boundary",
            sql.SQL(
                "SELECT count(*) FROM threadline.changes c WHERE c.captured_at >= %(a)s AND c.captured_at < %(b)s"
            ),
            {"a": sample["window"][0], "b": sample["window"][1]},
        ),
        (
            "window-page",
            "timeline page: first 100 changes of that window, with the transaction join",
            _SELECT
            + sql.SQL(
                " WHERE c.captured_at >= %(a)s AND c.captured_at < %(b)s ORDER BY c.captured_at, c.id LIMIT 100"
            ),
            {"a": sample["window"][0], "b": sample["window"][1]},
        ),
    ]


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def plan_stats(plan: dict[str, Any]) -> dict[str, Any]:
    """Execution time, buffers, and the audit relations the plan reads (in the plan / executed)."""
    top = plan["Plan"]
    in_plan: dict[str, set[str]] = {"changes": set(), "transactions": set()}
    executed: dict[str, set[str]] = {"changes": set(), "transactions": set()}
    removed = 0
    for node in _walk(top):
        removed += node.get("Subplans Removed", 0)
        rel = node.get("Relation Name")
        if rel and rel not in ("changes", "transactions") and rel.startswith(("changes", "transactions")):
            kind = "changes" if rel.startswith("changes") else "transactions"
            in_plan[kind].add(rel)
            if node.get("Actual Loops", 0) > 0:
                executed[kind].add(rel)
    return {
        "ms": plan["Execution Time"],
        "hit": top.get("Shared Hit Blocks", 0),
        "read": top.get("Shared Read Blocks", 0),
        "rows": top.get("Actual Rows", 0),
        "in_plan": {k: len(v) for k, v in in_plan.items()},
        "executed": {k: len(v) for k, v in executed.items()},
        "removed": removed,
    }


def explain(
    conn: psycopg.Connection, statement: sql.Composable, params: dict[str, Any], setting: str | None = None
) -> tuple[dict, str]:
    query = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + statement
    with conn.transaction(force_rollback=True):  # an UPDATE explained changes nothing
        if setting:
            conn.execute(f"SET LOCAL {setting}")
        conn.execute(query, params)  # warm the cache
        row = conn.execute(query, params).fetchone()
        assert row is not None
        data = row[0] if not isinstance(row[0], str) else json.loads(row[0])
        text = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ") + statement, params).fetchall()
    return data[0], "\n".join(r[0] for r in text)


def seal_ms(conn: psycopg.Connection, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn.execute("SELECT * FROM threadline.seal(1000)")
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# partition maintenance locks

LOCKS_SQL = """
SELECT c.relname::text, string_agg(l.mode, ', ' ORDER BY l.mode)
  FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
 WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation'
   AND c.relname IN ('changes', 'changes_default')
 GROUP BY 1 ORDER BY 1
"""


def maintenance_locks(
    conn: psycopg.Connection, months: list[tuple[str, datetime, datetime]]
) -> list[tuple[str, str]]:
    """The locks each partition operation takes on the parent and the DEFAULT partition (each
    run in a transaction that is rolled back), and what a non-empty DEFAULT partition does."""
    row = conn.execute(
        "SELECT %s::timestamptz, %s::timestamptz + interval '1 month'", [months[-1][2], months[-1][2]]
    ).fetchone()
    assert row is not None
    names = {
        "next": sql.Identifier("threadline", "changes_next"),
        "lo": sql.Literal(row[0]),
        "hi": sql.Literal(row[1]),
        "oldest": sql.Identifier(
            "threadline",
            "changes_"
            + next(
                s
                for s, _lo, _hi in months
                if conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"threadline.changes_{s}"]).fetchone()
                == (True,)
            ),
        ),
    }
    out: list[tuple[str, str]] = []

    def attempt(label: str, statements: list[str], setup: str | None = None) -> None:
        if setup:
            conn.execute(sql.SQL(setup).format(**names))
        try:
            with conn.transaction(force_rollback=True):
                for statement in statements:
                    conn.execute(sql.SQL(statement).format(**names))
                locks = conn.execute(LOCKS_SQL).fetchall()
            out.append((label, "; ".join(f"{r[0]}: {r[1]}" for r in locks) or "none"))
        except psycopg.Error as exc:
            out.append((label, f"error: {str(exc).splitlines()[0]}"))
        finally:
            if setup:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {next}").format(**names))

    attempt(
        "CREATE TABLE … PARTITION OF (a new month)",
        ["CREATE TABLE {next} PARTITION OF threadline.changes FOR VALUES FROM ({lo}) TO ({hi})"],
    )
    attempt(
        "ATTACH PARTITION (table and indexes prepared beforehand)",
        ["ALTER TABLE threadline.changes ATTACH PARTITION {next} FOR VALUES FROM ({lo}) TO ({hi})"],
        setup="CREATE TABLE {next} (LIKE threadline.changes INCLUDING DEFAULTS INCLUDING INDEXES)",
    )
    attempt(
        "DETACH PARTITION (oldest month left)", ["ALTER TABLE threadline.changes DETACH PARTITION {oldest}"]
    )
    attempt("DROP TABLE (oldest month left)", ["DROP TABLE {oldest}"])
    try:  # not in a transaction block
        conn.execute(
            sql.SQL("ALTER TABLE threadline.changes DETACH PARTITION {oldest} CONCURRENTLY").format(**names)
        )
        out.append(("DETACH PARTITION … CONCURRENTLY", "succeeded"))
    except psycopg.Error as exc:
        out.append(("DETACH PARTITION … CONCURRENTLY", f"error: {str(exc).splitlines()[0]}"))
    attempt(
        "CREATE TABLE … PARTITION OF a month the DEFAULT partition has a row of",
        [
            "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, captured_at)"
            " VALUES (0, 'app', 'late', 'insert', {lo}::timestamptz + interval '1 day')",
            "CREATE TABLE {next} PARTITION OF threadline.changes FOR VALUES FROM ({lo}) TO ({hi})",
        ],
    )
    return out


# ---------------------------------------------------------------------------------------------


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{STEP_TIMEOUT}s'")
        yield conn


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    with scratch_database("tl_part_plain") as plain_dsn, scratch_database("tl_part_parted") as parted_dsn:
        run({"unpartitioned": plain_dsn, "partitioned": parted_dsn})


def run(dsns: dict[str, str]) -> None:
    started = time.monotonic()
    with connect(dsns["unpartitioned"]) as plain, connect(dsns["partitioned"]) as parted:
        conns = {"unpartitioned": plain, "partitioned": parted}
        version = plain.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        others = plain.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND datname NOT IN (%s, %s)",
            [plain.info.dbname, parted.info.dbname],
        ).fetchone()[0]  # type: ignore[index]
        for conn in conns.values():
            ddl.install(conn)
        months = partition_store(parted)
        for conn in conns.values():
            conn.execute(APP_TABLE.format(n=TABLE_ROWS))
            ddl.track(conn, "app.t8")
            conn.execute("VACUUM ANALYZE")
        shape = shape_differences(plain, parted)
        checks = {name: verify_capture(conn) for name, conn in conns.items()}

        print(
            f"# Time-partitioned audit store vs the current one\n\nPostgreSQL {version}, {os.cpu_count()} cores; "
            f"{other_note(others)}\n"
        )
        print(
            f"Partitioned store: `changes` by `captured_at`, `transactions` by `occurred_at`, {len(months)} monthly "
            f"partitions from {months[0][1]:%Y-%m-%d} to {months[-1][2]:%Y-%m-%d} and a DEFAULT partition.\n"
        )
        print("## Setup checks\n")
        print(
            "Differences between the two stores' audit tables (columns, defaults, identity, indexes, triggers):\n"
        )
        for line in shape or ["none"]:
            print(f"- {line}")
        print()
        for name, line in checks.items():
            print(f"- capture into the {name} store: {line}")
        print()
        sys.stdout.flush()

        # capture cost
        tps: dict[str, dict[str, list[float]]] = {w: {s: [] for s in STORES} for w in PGBENCH}
        for r in range(ROUNDS):
            order = STORES if r % 2 == 0 else STORES[::-1]
            for workload, script in PGBENCH.items():
                for store in order:
                    tps[workload][store].append(pgbench_tps(dsns[store], script))
        print(
            f"## Capture cost\n\npgbench, 1 client, {SECONDS} s per run, {ROUNDS} rounds in alternating order; median TPS.\n"
        )
        print(
            "| workload | unpartitioned TPS | partitioned TPS | ratio of medians | median of per-round ratios "
            "| runs (unpart. / part.) |"
        )
        print("|---|---:|---:|---:|---:|---|")
        for workload, by_store in tps.items():
            a, b = (statistics.median(by_store[s]) for s in STORES)
            paired = statistics.median(
                p / u for u, p in zip(by_store[STORES[0]], by_store[STORES[1]], strict=True)
            )
            runs = " / ".join(", ".join(f"{v:.0f}" for v in by_store[s]) for s in STORES)
            print(f"| {workload} | {a:.0f} | {b:.0f} | {b / a:.3f} | {paired:.3f} | {runs} |")
        bulk: dict[str, dict[str, list[float]]] = {op: {s: [] for s in STORES} for op in BULK}
        for r in range(BULK_RUNS):
            order = STORES if r % 2 == 0 else STORES[::-1]
            for op in BULK:
                for store in order:
                    bulk[op][store].append(bulk_ms(conns[store], op))
        print(
            f"\nOne statement changing {BULK_ROWS:,} rows of the tracked table, median of {BULK_RUNS} (ms):\n"
        )
        print("| statement | unpartitioned | partitioned | ratio of medians | median of per-round ratios |")
        print("|---|---:|---:|---:|---:|")
        for op, by_store in bulk.items():
            a, b = (statistics.median(by_store[s]) for s in STORES)
            paired = statistics.median(
                p / u for u, p in zip(by_store[STORES[0]], by_store[STORES[1]], strict=True)
            )
            print(f"| {op} | {a:.0f} | {b:.0f} | {b / a:.3f} | {paired:.3f} |")
        print()
        sys.stdout.flush()

        # retention: fill
        for conn in conns.values():
            conn.execute("TRUNCATE threadline.changes, threadline.transactions")
        end = plain.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        start = plain.execute(
            "SELECT %s::timestamptz - %s::interval", [end, f"{MONTHS_BACK} months"]
        ).fetchone()[0]  # type: ignore[index]
        cutoff = plain.execute("SELECT %s::timestamptz - %s::interval", [end, KEEP]).fetchone()[0]  # type: ignore[index]
        filled = {name: fill(conn, start, end) for name, conn in conns.items()}
        sizes = {name: audit_size(conn) for name, conn in conns.items()}
        in_default = parted.execute(
            "SELECT (SELECT count(*) FROM threadline.changes_default), (SELECT count(*) FROM threadline.transactions_default)"
        ).fetchone()
        print(
            f"## Retention\n\nFilled {CHANGES:,} changes in {CHANGES // PER_TX:,} transactions, captured evenly from "
            f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} (UTC), {ROW_KEYS:,} distinct rows; rows in the DEFAULT "
            f"partitions: {in_default}.\n"
        )
        print("| store | fill (INSERTs) | VACUUM ANALYZE | audit tables size |")
        print("|---|---:|---:|---:|")
        for name in STORES:
            print(f"| {name} | {filled[name][0]:.0f} s | {filled[name][1]:.0f} s | {mb(sizes[name])} |")
        print()
        for name, conn in conns.items():
            print(f"Capture's lookup of the transaction row on the filled {name} store (generic plan):\n")
            print(f"```\n{lookup_plan(conn)}\n```\n")
        sys.stdout.flush()

        # read plans, on the filled stores
        row = parted.execute(
            "SELECT t.id, t.occurred_at, t.correlation_id FROM threadline.transactions t"
            " WHERE t.occurred_at >= %s::timestamptz - interval '3 months' ORDER BY t.occurred_at LIMIT 1",
            [end],
        ).fetchone()
        assert row is not None
        w0 = parted.execute(
            "SELECT date_trunc('month', %s::timestamptz - interval '2 months') - interval '5 days'", [end]
        ).fetchone()[0]  # type: ignore[index]
        w1 = parted.execute("SELECT %s::timestamptz + interval '10 days'", [w0]).fetchone()[0]  # type: ignore[index]
        sample = {"tid": row[0], "at": row[1], "cid": row[2], "row": 4242, "window": (w0, w1)}
        print(
            f"## Read plans (filled stores, before the purge)\n\nSample: transaction {sample['tid']} "
            f'({sample["at"]:%Y-%m-%d}), correlation id `{sample["cid"]}`, row `{{"id": {sample["row"]}}}` of '
            f"app.items, window {w0:%Y-%m-%d} to {w1:%Y-%m-%d}. Warm cache; second run of each.\n"
        )
        print(
            "| query | rows | unpart. ms | part. ms | unpart. buffers | part. buffers "
            "| changes partitions: in plan / executed | transactions partitions: in plan / executed | subplans removed |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        texts = []
        unpartitioned_texts = []
        for key, what, statement, params in plan_queries(sample):
            stats = {}
            for name, conn in conns.items():
                data, text = explain(conn, statement, params)
                stats[name] = plan_stats(data)
                if name == "partitioned":
                    texts.append((key, what, text))
                elif key.startswith("window"):
                    unpartitioned_texts.append((key, what, text))
                    # the same read where the planner must take the BRIN index: its best case
                    data, text = explain(conn, statement, params, "enable_seqscan = off")
                    brin = plan_stats(data)
                    unpartitioned_texts.append((f"{key}, enable_seqscan = off", what, text))
            a, b = stats["unpartitioned"], stats["partitioned"]
            print(
                f"| {key}: {what} | {b['rows']} | {a['ms']:.2f} | {b['ms']:.2f} | {a['hit'] + a['read']} | "
                f"{b['hit'] + b['read']} | {b['in_plan']['changes']} / {b['executed']['changes']} | "
                f"{b['in_plan']['transactions']} / {b['executed']['transactions']} | {b['removed']} |"
            )
            if key.startswith("window"):
                print(
                    f"| … unpartitioned with `enable_seqscan = off` (BRIN) | {brin['rows']} | {brin['ms']:.2f} | | "
                    f"{brin['hit'] + brin['read']} | | | | |"
                )
        print("\nPlans on the partitioned store:\n")
        for key, what, text in texts:
            print(f"### {key}: {what}\n\n```\n{text}\n```\n")
        print("Plans of the time-bounded reads on the unpartitioned store:\n")
        for key, what, text in unpartitioned_texts:
            print(f"### unpartitioned {key}: {what}\n\n```\n{text}\n```\n")
        sys.stdout.flush()

        # retention: purge
        results = {
            "unpartitioned": purge_unpartitioned(plain, cutoff),
            "partitioned": purge_partitioned(parted, cutoff, months),
        }
        left = {name: counts(conn) for name, conn in conns.items()}
        p = results["partitioned"]
        print(
            f"## Purge of everything captured before {cutoff:%Y-%m-%d %H:%M} ({KEEP} before the fill's end)\n\n"
            f"Unpartitioned: the batched DELETEs of `threadline/retention.py` (batches of {BATCH:,}, each its own "
            f"transaction). Partitioned: DROP of the {p['dropped']} monthly partitions of each table wholly before the "
            f"cut-off, then the same batched DELETEs with the partition key added to each DELETE, on what is left "
            f"(partition {p['edge']}); before them, one batch of `retention.purge` as it is. A CHECKPOINT precedes "
            f"each store's purge; WAL is the cluster's.\n"
        )
        print(
            "| store | time | WAL | changes / transactions deleted by DELETE (batches) | size before | size after "
            "| plain VACUUM | size after VACUUM |"
        )
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for name in STORES:
            r = results[name]
            d = r["deleted"]
            print(
                f"| {name} | {r['seconds']:.1f} s | {mb(r['wal'])} | {d[0]:,} / {d[1]:,} ({d[2]}) | {mb(r['size_before'])} | "
                f"{mb(r['size_after'])} | {r['vacuum_s']:.1f} s, {mb(r['vacuum_wal'])} WAL | {mb(r['size_vacuumed'])} |"
            )
        print(
            f"\nPartitioned, in parts: DROP {p['drop_s']:.2f} s, {p['drop_wal'] / 1024:,.0f} kB WAL; one batch of "
            f"`retention.purge` as it is ({p['probe_rows']:,} changes) {p['probe_s']:.2f} s; the batched DELETEs with the "
            f"partition key {p['edge_s']:.1f} s; {mb(p['edge_wal'])} WAL for the DELETEs.\n"
        )
        print("| store | changes left | transactions left | changes without their transaction row |")
        print("|---|---:|---:|---:|")
        for name in STORES:
            print(f"| {name} | {left[name][0]:,} | {left[name][1]:,} | {left[name][2]:,} |")
        print()
        # sealing reads changes by transaction; measured after the purge, which would otherwise
        # have sealed rows to account for
        seal = {name: seal_ms(conn) for name, conn in conns.items()}
        print(
            f"One seal batch of 1,000 transactions on the purged stores (`threadline.seal(1000)`, median of 3): "
            f"unpartitioned {seal['unpartitioned']:.0f} ms, partitioned {seal['partitioned']:.0f} ms "
            f"({seal['partitioned'] / seal['unpartitioned']:.2f}x).\n"
        )
        sys.stdout.flush()

        print("## Partition maintenance locks (partitioned store, each in a rolled-back transaction)\n")
        print("| operation | locks held on `changes` / `changes_default` |")
        print("|---|---|")
        for label, locks in maintenance_locks(parted, months):
            print(f"| {label} | {locks} |")
        print(f"\nTotal run time: {(time.monotonic() - started) / 60:.1f} min.")


def other_note(others: int) -> str:
    return (
        "no other client sessions on the server at the start"
        if not others
        else f"{others} other client session(s) on the server at the start (they share CPU and WAL)"
    )


if __name__ == "__main__":
    main()
