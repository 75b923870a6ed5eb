"""Partitioning benchmark: threadline's two audit-store layouts side by side, in one run.

Run with ``python bench/partitioning.py``; the header names the server, the machine, the
settings and the library's commit (with its uncommitted files) the run imported. Builds two
scratch databases (``bench/_db.py``): store "plain", installed with
``ddl.install(conn, partition_by=None)`` (unpartitioned ``transactions`` and ``changes``), and
store "partitioned", installed with ``ddl.install(conn)`` (the default: both tables
range-partitioned monthly by the transaction's start time ``occurred_at``, a DEFAULT partition
each) and then ``partitions.create_partitions(conn, since=<13 months ago>)``, so it holds the
partitions of the 13 months before the current one, the current one, 3 ahead and DEFAULT. Both
track the same 8-column table ``app.t8`` (100,000 rows). Then it measures, printing
Markdown to stdout:

- capture cost: single-row INSERT and UPDATE transactions of the tracked table with pgbench
  (1 client, PART_SECONDS per run, PART_ROUNDS rounds in alternating store order, median TPS and
  the ratio partitioned / plain), one statement inserting / updating 10,000 rows (median of 5),
  and the locks one audited single-row UPDATE transaction holds before it commits (``pg_locks``
  rows of its own backend: all, relation locks, those on audit relations, those outside the
  16 fast-path slots), for the first transaction of a session and once its plans are cached;
- fill: both stores' audit tables emptied (identity restarted) and filled with PART_CHANGES
  changes, 10 per transaction, spread evenly over the last 12 months, written directly with
  generate_series in capture order (``captured_at`` = the transaction's ``occurred_at`` + k ms;
  partitioned, ``changes.occurred_at`` = its transaction's ``occurred_at``). Each change is an
  insert or update of one of PART_CHANGES / 50 rows of ``app.t8`` (so a row has ~50 changes
  across the year), each transaction has a correlation id shared with 4 others. The ``xid`` of
  the filled transactions grows with time but stays below the server's current transaction id
  (several filled transactions share one), so all of them can be sealed. Fill and
  VACUUM ANALYZE times, sizes, and the rows in the DEFAULT partitions (must be none);
- reads on the filled stores through the library (``threadline.history``, ``trace``,
  ``timeline(table=..., since=..., until=since + 10 days, limit=100)``,
  ``changes_for_transaction``): p50 / p95 over PART_READS calls each (default 50) with varied
  keys, both stores interleaved, after 5 warm-up calls; then every statement the library sends
  for one call of each, captured from its cursor and run under EXPLAIN (ANALYZE, BUFFERS): time,
  planning time, buffers and the partitions of each table in the plan / executed; the text plans
  of ``history``'s and ``trace``'s change reads on both stores, and of any statement that is
  3x slower (and 1 ms slower) on the partitioned store;
- seal: ``threadline.ops.seal.seal(conn)`` of every filled transaction (time, rate), then
  ``verify(conn)`` (time, ok), and ``verify(conn)`` again in the session with ``jit = off`` (JIT
  compilation of verify's statements, under the server's default ``jit = on``, can dominate it);
- retention: ``threadline.ops.retention.purge(conn, <6 months before the fill's end>,
  batch_size=PART_BATCH)`` on each (sealed) store: time, WAL written (``pg_current_wal_lsn()``
  difference after a CHECKPOINT; the WAL position is the cluster's, so other activity on the
  server adds to it), the audit tables' size before and after (every partition, indexes and
  TOAST), the PurgeResult fields, the filled rows left, ``verify(conn)`` afterwards, and a plain
  VACUUM after. Meanwhile a writer thread runs captured single-row INSERT transactions on the
  tracked table (10 ms apart): their count, p50 / p99 / max latency and failures.

Environment: THREADLINE_DSN (server), PART_CHANGES (default 10,000,000), PART_SECONDS (10),
PART_ROUNDS (4), PART_BATCH (10,000), PART_READS (50), PART_STEP_TIMEOUT (statement timeout of
each statement, seconds; default 1800).
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import threadline  # noqa: E402
from bench._db import pgbench_tps as run_pgbench  # noqa: E402
from bench._db import scratch_database  # noqa: E402
from threadline import ddl  # noqa: E402
from threadline.explore.selection import changed_fields_sql  # noqa: E402
from threadline.ops import (  # noqa: E402
    partitions,
    retention,
)
from threadline.ops.seal import seal, verify  # noqa: E402

CHANGES = int(os.environ.get("PART_CHANGES", "10000000"))
SECONDS = int(os.environ.get("PART_SECONDS", "10"))
ROUNDS = int(os.environ.get("PART_ROUNDS", "4"))
BATCH = int(os.environ.get("PART_BATCH", "10000"))
READS = int(os.environ.get("PART_READS", "50"))
STEP_TIMEOUT = int(os.environ.get("PART_STEP_TIMEOUT", "1800"))
PER_TX = 10
TRANSACTIONS = CHANGES // PER_TX
MONTHS_BACK = 12  # the fill's span
PARTITIONS_SINCE = 13  # months before now the partitioned store has partitions from
KEEP = "6 months"
ROW_KEYS = max(1, CHANGES // 50)  # distinct rows of the filled changes: ~50 changes each
PER_CORRELATION = 5  # transactions sharing a correlation id
WARMUP = 5
WINDOW = timedelta(days=10)
BULK_ROWS = 10_000
BULK_RUNS = 5
TABLE_ROWS = 100_000
WRITER_PAUSE = 0.01

STORES = ("plain", "partitioned")
CONTEXT = '{"actor":{"id":"42","type":"user"},"correlation_id":"bench","v":1}'

APP_TABLE = (
    "CREATE SCHEMA app;"
    " CREATE TABLE app.t8 (id bigint PRIMARY KEY, a int, b text, c text, d int, e timestamptz, f bool, g numeric);"
    " INSERT INTO app.t8 SELECT g, g, 'x' || g, 'y', g, now(), true, g FROM generate_series(1, {n}) g;"
)


# ---------------------------------------------------------------------------------------------
# building the stores


def build(conn: psycopg.Connection, store: str) -> None:
    """Install the store's layout, partitions from PARTITIONS_SINCE months back, the tracked table."""
    if store == "plain":
        ddl.install(conn, partition_by=None)
    else:
        ddl.install(conn)
        since = conn.execute("SELECT now() - %s::interval", [f"{PARTITIONS_SINCE} months"]).fetchone()[0]  # type: ignore[index]
        partitions.create_partitions(conn, since=since)
    conn.execute(APP_TABLE.format(n=TABLE_ROWS))
    ddl.track(conn, "app.t8")
    conn.execute("VACUUM ANALYZE")


def layout(conn: psycopg.Connection) -> str:
    parts = partitions.partitions(conn)
    if not parts:
        return "plain tables"
    ranged = [p for p in parts if p.table == "changes" and not p.is_default]
    settings = partitions.partition_settings(conn)
    return (
        f"{settings.period if settings else '?'}ly partitions, per table {len(ranged)} ranged "
        f"({ranged[0].range_from:%Y-%m-%d} to {ranged[-1].range_to:%Y-%m-%d}) + DEFAULT"
    )


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
    """TPS of ``script`` (pgbench, one client, SECONDS)."""
    return run_pgbench(dsn, script, SECONDS)


BULK = {
    "INSERT": (
        f"INSERT INTO app.t8 SELECT g, g, 'x', 'y', g, now(), true, g FROM generate_series(1000001, {1000000 + BULK_ROWS}) g",
        "DELETE FROM app.t8 WHERE id > 1000000 AND id <= 2000000",
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


def update_locks(dsn: str, warm: int = 10) -> dict[str, tuple[int, int, int, int]]:
    """The locks an audited single-row UPDATE transaction holds before it commits, on a new
    session's first transaction and after ``warm`` more (plans cached): (all, relation, on audit
    relations, not fast-path), the view pg_locks itself left out."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        view = conn.execute("SELECT 'pg_catalog.pg_locks'::regclass::oid").fetchone()[0]  # type: ignore[index]
        audit = {
            r[0]
            for r in conn.execute(
                "SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'threadline'::regnamespace"
            ).fetchall()
        }
        for i in range(warm + 1):
            with conn.transaction():
                conn.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT])
                conn.execute("UPDATE app.t8 SET a = a + 1 WHERE id = %s", [i + 1])
                rows = conn.execute(
                    "SELECT locktype, relation, fastpath FROM pg_locks WHERE pid = pg_backend_pid()"
                ).fetchall()
            rows = [r for r in rows if r[1] != view]
            if i in (0, warm):
                out["first transaction" if i == 0 else f"after {warm} transactions"] = (
                    len(rows),
                    sum(1 for r in rows if r[0] == "relation"),
                    sum(1 for r in rows if r[0] == "relation" and r[1] in audit),
                    sum(1 for r in rows if not r[2]),
                )
    return out


# ---------------------------------------------------------------------------------------------
# fill

FILL_TRANSACTIONS = """
INSERT INTO threadline.transactions (xid, occurred_at, actor, correlation_id, request_id, origin)
SELECT (3 + (g::bigint - 1) * %(xids)s / %(n)s)::text::xid8,
       %(start)s::timestamptz + (%(end)s::timestamptz - %(start)s::timestamptz) * ((g - 1)::float8 / %(n)s),
       jsonb_build_object('type', 'user', 'id', (g %% 1000)::text), 'req-' || ((g - 1) / %(per_corr)s),
       'r-' || g, 'web'
  FROM generate_series(1, %(n)s) g
 ORDER BY g
"""
FILL_CHANGES = """
INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, after, before, captured_at{occ})
SELECT t.id, 'app', 't8', CASE WHEN m.n < %(keys)s THEN 'insert' ELSE 'update' END,
       jsonb_build_object('id', m.key),
       json_build_object('id', m.key, 'a', m.n, 'b', 'x' || m.key, 'c', 'y', 'd', k, 'e', t.occurred_at,
                         'f', true, 'g', m.n),
       CASE WHEN m.n >= %(keys)s THEN
           json_build_object('id', m.key, 'a', m.n - %(keys)s, 'b', 'x' || m.key, 'c', 'y', 'd', k,
                             'e', t.occurred_at, 'f', true, 'g', m.n - %(keys)s) END,
       t.occurred_at + k * interval '1 millisecond'{occ_value}
  FROM threadline.transactions t CROSS JOIN generate_series(1, %(per_tx)s) k
 CROSS JOIN LATERAL (SELECT (t.id - 1) * %(per_tx)s + k - 1 AS n) n0
 CROSS JOIN LATERAL (SELECT n0.n, n0.n %% %(keys)s + 1 AS key) m
 WHERE t.id >= %(lo)s AND t.id < %(hi)s
 ORDER BY t.id, k
"""


def fill(
    conn: psycopg.Connection, store: str, start: datetime, end: datetime, xids: int
) -> tuple[float, float]:
    """Write CHANGES changes in TRANSACTIONS transactions spread from start to end, with xids
    from 3 up to ``xids``; returns (seconds of the INSERTs, seconds of the VACUUM ANALYZE)."""
    conn.execute("TRUNCATE threadline.changes, threadline.transactions RESTART IDENTITY")
    t0 = time.monotonic()
    with conn.transaction():
        # the deferred refresh_context trigger is the capture path's; a bulk load skips it
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            FILL_TRANSACTIONS,
            {"start": start, "end": end, "n": TRANSACTIONS, "xids": xids, "per_corr": PER_CORRELATION},
        )
    statement = FILL_CHANGES.format(
        occ=", occurred_at" if store == "partitioned" else "",
        occ_value=", t.occurred_at" if store == "partitioned" else "",
    )
    step = 100_000
    for first in range(1, TRANSACTIONS + 1, step):
        with conn.transaction():
            conn.execute(
                statement,
                {
                    "per_tx": PER_TX,
                    "keys": ROW_KEYS,
                    "lo": first,
                    "hi": min(first + step, TRANSACTIONS + 1),
                },
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


def in_default(conn: psycopg.Connection) -> str:
    if not partitions.is_partitioned(conn):
        return "n/a"
    row = conn.execute(
        "SELECT (SELECT count(*) FROM threadline.transactions_default), (SELECT count(*) FROM threadline.changes_default)"
    ).fetchone()
    assert row is not None
    return f"{row[0]:,} / {row[1]:,}"


def filled_left(conn: psycopg.Connection) -> tuple[int, int, int]:
    """Filled (not the writer's) changes and transactions left, and changes without their
    transaction row."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM threadline.changes WHERE transaction_id <= %(n)s),"
        " (SELECT count(*) FROM threadline.transactions WHERE id <= %(n)s),"
        " (SELECT count(*) FROM threadline.changes c"
        "   WHERE NOT EXISTS (SELECT 1 FROM threadline.transactions t WHERE t.id = c.transaction_id))",
        {"n": TRANSACTIONS},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# ---------------------------------------------------------------------------------------------
# reads


class RecordingCursor(psycopg.Cursor[Any]):
    """A cursor that notes every statement it runs while ``log`` is a list (the library's queries
    run on cursors of the connection it is given)."""

    log: ClassVar[list[tuple[Any, Any]] | None] = None

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if RecordingCursor.log is not None:
            RecordingCursor.log.append((query, params))
        return super().execute(query, params, **kwargs)


def read_calls(
    start: datetime, end: datetime
) -> dict[str, tuple[Callable[..., Any], Callable[[random.Random], Any]]]:
    """Each read: (call(conn, key) returning how many changes it got, key(rng))."""

    def window(rng: random.Random) -> datetime:
        return start + (end - start - WINDOW) * rng.random()

    return {
        "history(app.t8, pk)": (
            lambda conn, k: len(threadline.history(conn, "app.t8", k)),
            lambda rng: rng.randint(1, ROW_KEYS),
        ),
        "trace(correlation_id)": (
            lambda conn, k: threadline.trace(conn, k).change_count,
            lambda rng: f"req-{rng.randrange(TRANSACTIONS // PER_CORRELATION)}",
        ),
        "timeline(table, 10-day window, limit 100)": (
            lambda conn, k: len(
                threadline.timeline(conn, table="app.t8", since=k, until=k + WINDOW, limit=100)
            ),
            window,
        ),
        "changes_for_transaction(id)": (
            lambda conn, k: len(threadline.changes_for_transaction(conn, k)),
            lambda rng: rng.randint(1, TRANSACTIONS),
        ),
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def time_reads(conns: dict[str, psycopg.Connection], calls: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """p50 / p95 ms and mean changes returned per read and store, keys the same on both."""
    rng = random.Random(20240601)
    out: dict[str, dict[str, Any]] = {}
    for name, (call, key) in calls.items():
        keys = [key(rng) for _ in range(WARMUP + READS)]
        times: dict[str, list[float]] = {s: [] for s in STORES}
        got: dict[str, list[int]] = {s: [] for s in STORES}
        for i, k in enumerate(keys):
            for store in STORES if i % 2 == 0 else STORES[::-1]:
                t0 = time.perf_counter()
                n = call(conns[store], k)
                elapsed = (time.perf_counter() - t0) * 1000
                if i >= WARMUP:
                    times[store].append(elapsed)
                    got[store].append(n)
        out[name] = {
            s: {
                "p50": percentile(times[s], 50),
                "p95": percentile(times[s], 95),
                "rows": statistics.mean(got[s]),
                "same": got[s] == got[STORES[0]],
            }
            for s in STORES
        }
        out[name]["sample"] = keys[WARMUP]
    return out


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def plan_stats(plan: dict[str, Any]) -> dict[str, Any]:
    """Times, buffers, and the audit relations the plan reads (in the plan / executed)."""
    top = plan["Plan"]
    in_plan: dict[str, set[str]] = {"changes": set(), "transactions": set()}
    executed: dict[str, set[str]] = {"changes": set(), "transactions": set()}
    for node in _walk(top):
        rel = node.get("Relation Name")
        if rel and rel.startswith(("changes", "transactions")):  # app.t8 is the only other table
            kind = "changes" if rel.startswith("changes") else "transactions"
            in_plan[kind].add(rel)
            if node.get("Actual Loops", 0) > 0:
                executed[kind].add(rel)
    return {
        "ms": plan["Execution Time"],
        "plan_ms": plan["Planning Time"],
        "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
        "parts": {k: (len(in_plan[k]), len(executed[k])) for k in in_plan},
    }


def describe(statement: Any, conn: psycopg.Connection) -> str:
    """A short label: the audit tables a statement reads and the start of its WHERE clause."""
    text = " ".join((statement.as_string(conn) if not isinstance(statement, str) else statement).split())
    text = text.replace(changed_fields_sql(sql.Identifier("threadline")).as_string(conn), "…").replace(
        '"threadline".', "threadline."
    )
    if "pg_class c JOIN pg_namespace n" in text:
        return "resolve the table (catalog)"
    if "relkind = 'p'" in text and "partitioned" in text:
        return "layout (once per connection)"
    tables = list(dict.fromkeys(re.findall(r"(?:FROM|JOIN) threadline\.(\w+)", text)))
    label = "timeline page (late rows, page, snapshot)" if "AS phase" in text else " JOIN ".join(tables)
    where = text.split(" WHERE ", 1)[1] if " WHERE " in text else ""
    where = re.split(r" ORDER BY | LIMIT ", where)[0]
    if len(where) > 90:
        where = where[:87] + "…"
    return f"{label}: {where}" if where else label


def explain(conn: psycopg.Connection, statement: Any, params: Any) -> tuple[dict[str, Any], str]:
    prefix = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ")
    body = sql.SQL(statement) if isinstance(statement, str) else statement
    with conn.transaction(force_rollback=True):
        conn.execute(prefix + body, params)  # warm
        row = conn.execute(prefix + body, params).fetchone()
        assert row is not None
        data = row[0] if not isinstance(row[0], str) else json.loads(row[0])
        text = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ") + body, params).fetchall()
    # long array constants (keys and start times of a batch) shortened in the text plan
    return data[0], re.sub(r"'\{([^']{60})[^']{40,}\}'", r"'{\1…}'", "\n".join(r[0] for r in text))


def explain_reads(
    conns: dict[str, psycopg.Connection], calls: dict[str, Any], samples: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every statement one call of each read sends, explained on both stores."""
    out = []
    for name, (call, _key) in calls.items():
        sent: dict[str, list[tuple[Any, Any]]] = {}
        for store in STORES:
            RecordingCursor.log = []
            try:
                call(conns[store], samples[name])
            finally:
                sent[store], RecordingCursor.log = RecordingCursor.log, None
        if len(sent["plain"]) != len(sent["partitioned"]):
            print(f"<!-- {name}: {len(sent['plain'])} vs {len(sent['partitioned'])} statements -->")
        for i, (a, b) in enumerate(zip(sent["plain"], sent["partitioned"], strict=False)):
            stats, texts = {}, {}
            for store, (statement, params) in zip(STORES, (a, b), strict=True):
                data, text = explain(conns[store], statement, params)
                stats[store], texts[store] = plan_stats(data), text
            out.append(
                {
                    "read": name,
                    "n": i + 1,
                    "what": describe(b[0], conns["partitioned"]),
                    "stats": stats,
                    "texts": texts,
                    "sql": " ".join(b[0].as_string(conns["partitioned"]).split()),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# retention


class Writer(threading.Thread):
    """Captured single-row INSERT transactions on the tracked table, WRITER_PAUSE apart."""

    def __init__(self, dsn: str, first_id: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.next_id = dsn, first_id
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    with conn.transaction():
                        conn.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT])
                        conn.execute(
                            "INSERT INTO app.t8 VALUES (%s, 1, 'w', 'y', 1, now(), true, 1)", [self.next_id]
                        )
                    self.latencies.append((time.perf_counter() - t0) * 1000)
                except psycopg.Error as exc:
                    self.failures.append(str(exc).splitlines()[0])
                self.next_id -= 1
                time.sleep(WRITER_PAUSE)


def purge_store(conn: psycopg.Connection, dsn: str, cutoff: datetime) -> dict[str, Any]:
    conn.execute("CHECKPOINT")
    before = audit_size(conn)
    writer = Writer(dsn, -1)
    writer.start()
    time.sleep(0.5)
    lsn = wal_lsn(conn)
    result = retention.purge(conn, cutoff, batch_size=BATCH)
    wal = wal_since(conn, lsn)
    time.sleep(0.5)
    writer.stop.set()
    writer.join()
    after = audit_size(conn)
    t0 = time.monotonic()
    checked = verify(conn)
    verify_s = time.monotonic() - t0
    left = filled_left(conn)
    lsn = wal_lsn(conn)
    t0 = time.monotonic()
    conn.execute("VACUUM threadline.changes, threadline.transactions")
    vacuum_s = time.monotonic() - t0
    return {
        "result": result,
        "wal": wal,
        "before": before,
        "after": after,
        "verify": checked,
        "verify_s": verify_s,
        "left": left,
        "vacuum_s": vacuum_s,
        "vacuum_wal": wal_since(conn, lsn),
        "vacuumed": audit_size(conn),
        "writer": writer,
    }


# ---------------------------------------------------------------------------------------------


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = '{STEP_TIMEOUT}s'")
        yield conn


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a else "n/a"


def main() -> None:
    with scratch_database("tl_part_plain") as plain_dsn, scratch_database("tl_part_parted") as parted_dsn:
        run({"plain": plain_dsn, "partitioned": parted_dsn})


def run(dsns: dict[str, str]) -> None:
    started = time.monotonic()
    with connect(dsns["plain"]) as plain, connect(dsns["partitioned"]) as parted:
        conns = {"plain": plain, "partitioned": parted}
        version = plain.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        shared = plain.execute("SHOW shared_buffers").fetchone()[0]  # type: ignore[index]
        jit = plain.execute("SHOW jit").fetchone()[0]  # type: ignore[index]
        others = plain.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND datname NOT IN (%s, %s)",
            [plain.info.dbname, parted.info.dbname],
        ).fetchone()[0]  # type: ignore[index]
        for store, conn in conns.items():
            build(conn, store)

        print(
            f"# threadline's audit store: plain vs partitioned\n\nPostgreSQL {version} (shared_buffers {shared}, "
            f"jit {jit}), {os.cpu_count()} cores; library {LIBRARY}; PART_CHANGES={CHANGES:,} ({TRANSACTIONS:,} transactions of {PER_TX} changes), "
            f"PART_SECONDS={SECONDS}, PART_ROUNDS={ROUNDS}, PART_BATCH={BATCH:,}, PART_READS={READS}; "
            f"{other_note(others)}.\n"
        )
        for store, conn in conns.items():
            print(f"- {store}: {layout(conn)}")
        print("- tracked table: `app.t8` (8 columns, bigint primary key), 100,000 rows\n")
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
            "| workload | plain TPS | partitioned TPS | partitioned / plain | median of per-round ratios | runs (plain / partitioned) |"
        )
        print("|---|---:|---:|---:|---:|---|")
        for workload, by_store in tps.items():
            a, b = (statistics.median(by_store[s]) for s in STORES)
            paired = statistics.median(
                p / u for u, p in zip(by_store["plain"], by_store["partitioned"], strict=True)
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
        print("| statement | plain | partitioned | partitioned / plain |")
        print("|---|---:|---:|---:|")
        for op, by_store in bulk.items():
            a, b = (statistics.median(by_store[s]) for s in STORES)
            print(f"| {op} | {a:.0f} | {b:.0f} | {b / a:.3f} |")
        locks = {store: update_locks(dsns[store]) for store in STORES}
        print(
            "\nLocks held by one audited single-row UPDATE transaction before it commits (`pg_locks` rows of its "
            "backend; a backend has 16 fast-path slots for relation locks):\n"
        )
        print("| store | when | locks | relation locks | on audit tables / indexes | not fast-path |")
        print("|---|---|---:|---:|---:|---:|")
        for store in STORES:
            for when, (total, rel, aud, slow_locks) in locks[store].items():
                print(f"| {store} | {when} | {total} | {rel} | {aud} | {slow_locks} |")
        print()
        sys.stdout.flush()

        # fill
        end = plain.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        start = plain.execute(
            "SELECT %s::timestamptz - %s::interval", [end, f"{MONTHS_BACK} months"]
        ).fetchone()[0]  # type: ignore[index]
        xids = (
            min(
                int(c.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()[0])  # type: ignore[index]
                for c in conns.values()
            )
            - 1000
        )
        filled = {store: fill(conn, store, start, end, xids) for store, conn in conns.items()}
        sizes = {store: audit_size(conn) for store, conn in conns.items()}
        defaults = {store: in_default(conn) for store, conn in conns.items()}
        print(
            f"## Fill\n\n{CHANGES:,} changes in {TRANSACTIONS:,} transactions, occurred evenly from "
            f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} (UTC); {ROW_KEYS:,} rows of `app.t8` "
            f"(~{CHANGES // ROW_KEYS} changes each), a correlation id per {PER_CORRELATION} transactions; xids 3 to "
            f"{xids:,} in time order ({TRANSACTIONS / max(xids, 1):.1f} transactions per xid). Written with "
            "generate_series (the deferred refresh_context trigger skipped), transactions in one statement, changes "
            "in statements of 100,000 transactions.\n"
        )
        print(
            "| store | fill (INSERTs) | VACUUM ANALYZE | audit tables size | rows in DEFAULT (transactions / changes) |"
        )
        print("|---|---:|---:|---:|---:|")
        for store in STORES:
            print(
                f"| {store} | {filled[store][0]:.0f} s | {filled[store][1]:.0f} s | {mb(sizes[store])} | {defaults[store]} |"
            )
        print()
        sys.stdout.flush()

        # reads
        calls = read_calls(start, end)
        with (
            psycopg.connect(dsns["plain"], autocommit=True, cursor_factory=RecordingCursor) as r_plain,
            psycopg.connect(dsns["partitioned"], autocommit=True, cursor_factory=RecordingCursor) as r_parted,
        ):
            readers = {"plain": r_plain, "partitioned": r_parted}
            timed = time_reads(readers, calls)
            explained = explain_reads(readers, calls, {name: timed[name]["sample"] for name in calls})
        print(
            f"## Reads (filled stores, through the library)\n\n{READS} calls each with varied keys (the same on both "
            f"stores, interleaved), after {WARMUP} warm-up calls; ms per call including the client's decoding.\n"
        )
        print(
            "| read | changes returned (mean) | plain p50 | plain p95 | partitioned p50 | partitioned p95 | p50 partitioned / plain |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in calls:
            a, b = timed[name]["plain"], timed[name]["partitioned"]
            same = "" if b["same"] else " (differ!)"
            print(
                f"| {name} | {a['rows']:.1f}{same} | {a['p50']:.2f} | {a['p95']:.2f} | {b['p50']:.2f} | {b['p95']:.2f} "
                f"| {ratio(a['p50'], b['p50'])} |"
            )
        print(
            "\nEvery statement one call sends (captured from the library's cursor), under EXPLAIN (ANALYZE, BUFFERS), "
            "second run: execution / planning ms, shared buffers, and partitions of `changes` / `transactions` in "
            "the plan / executed (partitioned store). Sample keys: "
            + ", ".join(f"{name.split('(')[0]} `{timed[name]['sample']}`" for name in calls)
            + ".\n"
        )
        print(
            "| read | # | statement (partitioned store's text) | plain exec / plan ms | partitioned exec / plan ms "
            "| plain buffers | partitioned buffers | changes parts | transactions parts |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        slow = []
        for e in explained:
            a, b = e["stats"]["plain"], e["stats"]["partitioned"]
            print(
                f"| {e['read'].split('(')[0]} | {e['n']} | {e['what'].replace('|', '/')} | {a['ms']:.2f} / {a['plan_ms']:.2f} "
                f"| {b['ms']:.2f} / {b['plan_ms']:.2f} | {a['buffers']} | {b['buffers']} "
                f"| {b['parts']['changes'][0]} / {b['parts']['changes'][1]} "
                f"| {b['parts']['transactions'][0]} / {b['parts']['transactions'][1]} |"
            )
            total_a, total_b = a["ms"] + a["plan_ms"], b["ms"] + b["plan_ms"]
            if total_b > 3 * total_a and total_b - total_a > 1:
                slow.append(e)
        shown = [
            e
            for e in explained
            if e["read"].startswith(("history", "trace")) and "changes" in e["what"].split(":")[0]
        ]
        for e in shown + [e for e in slow if e not in shown]:
            label = "slower on the partitioned store: " if e in slow and e not in shown else ""
            print(f"\n### {label}{e['read']}, statement {e['n']}\n\n```sql\n{e['sql']}\n```\n")
            for store in STORES:
                print(f"{store}:\n\n```\n{e['texts'][store]}\n```\n")
        sys.stdout.flush()

        # seal
        sealed = {}
        for store, conn in conns.items():
            t0 = time.monotonic()
            result = seal(conn)
            seal_s = time.monotonic() - t0
            t0 = time.monotonic()
            checked = verify(conn)
            verify_s = time.monotonic() - t0
            # the same verify with JIT compilation off (verify's statements cost enough to be compiled)
            conn.execute("SET jit = off")
            t0 = time.monotonic()
            unjitted = verify(conn)
            conn.execute("RESET jit")
            sealed[store] = (result, seal_s, checked, verify_s, unjitted, time.monotonic() - t0)
        print(
            "## Seal\n\n`seal(conn)` (batches of 1,000) of the filled stores, then `verify(conn)`, then `verify(conn)` "
            f"again in a session with `jit = off` (the server's setting: {jit}).\n"
        )
        print(
            "| store | sealed transactions | seals | seal time | transactions/s | verify time | verify ok "
            "| verify time, jit off | ok |"
        )
        print("|---|---:|---:|---:|---:|---:|---|---:|---|")
        for store in STORES:
            result, seal_s, checked, verify_s, unjitted, unjitted_s = sealed[store]
            print(
                f"| {store} | {result.transactions:,} | {result.seals:,} | {seal_s:.1f} s | "
                f"{result.transactions / seal_s:,.0f} | {verify_s:.1f} s | {checked.ok}"
                f"{'' if checked.ok else ' ' + str(checked.first_problem)} | {unjitted_s:.1f} s | {unjitted.ok} |"
            )
        print()
        sys.stdout.flush()

        # retention
        cutoff = plain.execute("SELECT %s::timestamptz - %s::interval", [end, KEEP]).fetchone()[0]  # type: ignore[index]
        purged = {store: purge_store(conn, dsns[store], cutoff) for store, conn in conns.items()}
        print(
            f"## Retention\n\n`retention.purge(conn, {cutoff:%Y-%m-%d %H:%M} UTC ({KEEP} before the fill's end), "
            f"batch_size={BATCH:,})` on the sealed stores, a CHECKPOINT before each; WAL is the cluster's. Meanwhile a "
            f"writer thread ran captured single-row INSERT transactions on the tracked table, {WRITER_PAUSE * 1000:.0f} ms "
            "apart.\n"
        )
        print(
            "| store | time | WAL | partitions dropped | changes | transactions | batches | complete | size before "
            "| size after | verify after (time) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
        for store in STORES:
            p = purged[store]
            r = p["result"]
            v = p["verify"]
            print(
                f"| {store} | {r.seconds:.1f} s | {mb(p['wal'])} | {r.partitions} | {r.changes:,} | {r.transactions:,} "
                f"| {r.batches:,} | {r.complete} | {mb(p['before'])} | {mb(p['after'])} "
                f"| {'ok' if v.ok else 'FAILED: ' + str(v.first_problem)} ({p['verify_s']:.1f} s; {v.purged:,} purged) |"
            )
        print(
            "\n| store | filled changes left | filled transactions left | changes without a transaction row | plain VACUUM after | size after VACUUM |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for store in STORES:
            p = purged[store]
            left = p["left"]
            print(
                f"| {store} | {left[0]:,} | {left[1]:,} | {left[2]:,} | {p['vacuum_s']:.1f} s, {mb(p['vacuum_wal'])} WAL "
                f"| {mb(p['vacuumed'])} |"
            )
        print("\nThe concurrent writer during each purge:\n")
        print("| store | transactions | failed | p50 ms | p99 ms | max ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for store in STORES:
            w = purged[store]["writer"]
            lat = w.latencies or [0.0]
            failed = f"{len(w.failures)}" + (f" ({w.failures[0]})" if w.failures else "")
            print(
                f"| {store} | {len(w.latencies):,} | {failed} | {percentile(lat, 50):.1f} | {percentile(lat, 99):.1f} "
                f"| {max(lat):.1f} |"
            )
        print(f"\nTotal run time: {(time.monotonic() - started) / 60:.1f} min.")


def library_version() -> str:
    """The commit of the library this run imported, and its uncommitted files (read at start)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "threadline"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "version unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {commit}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


LIBRARY = library_version()


def other_note(others: int) -> str:
    return (
        "no other client sessions on the server at the start"
        if not others
        else f"{others} other client session(s) on the server at the start (they share CPU and WAL)"
    )


if __name__ == "__main__":
    main()
