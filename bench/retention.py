"""Retention benchmark: purge rate on 1,000,000 changes, and the latency of audited writes while
a purge runs.

Run with ``make bench-ops`` (or ``python bench/retention.py``; PURGE_ROWS changes the size).
Fills the audit tables with old rows (10 changes per transaction), measures single-row audited
write transactions (one client, a context each) alone, then again while ``purge`` deletes
everything old in batches of 10,000.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench._db import scratch_database  # noqa: E402
from threadline import ActorRef, ThreadlineConnection, context, ddl  # noqa: E402
from threadline.ops import retention  # noqa: E402

ROWS = int(os.environ.get("PURGE_ROWS", "1000000"))
BATCH = int(os.environ.get("PURGE_BATCH", "10000"))
PER_TX = 10


def fill(conn: psycopg.Connection) -> None:
    txs = ROWS // PER_TX
    conn.execute(
        "INSERT INTO threadline.transactions (occurred_at, actor, correlation_id, origin)"
        " SELECT now() - interval '100 days', '{\"type\": \"user\", \"id\": \"1\"}', 'old-' || g, 'web'"
        " FROM generate_series(1, %s) g",
        [txs],
    )
    conn.execute(
        "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, after, captured_at)"
        " SELECT t, 'app', 'items', 'insert', jsonb_build_object('id', t * 10 + k),"
        "        jsonb_build_object('id', t * 10 + k, 'name', 'item ' || k), now() - interval '100 days'"
        " FROM generate_series(1, %s) t, generate_series(1, %s) k",
        [txs, PER_TX],
    )
    conn.execute("VACUUM ANALYZE threadline.changes, threadline.transactions")


def write_latencies(dsn: str, stop: threading.Event, seconds: float | None = None) -> list[float]:
    out: list[float] = []
    with ThreadlineConnection.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        i = 0
        while not stop.is_set() and (seconds is None or time.monotonic() - started < seconds):
            i += 1
            t0 = time.perf_counter()
            with context(actor=ActorRef.user("9"), correlation_id=f"live-{i}"), conn.transaction():
                conn.execute("INSERT INTO app.items (name) VALUES ('live')")
            out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1] if len(values) > 1 else float("nan")


def main() -> None:
    with scratch_database("threadline_bench_retention") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn)
            conn.execute(
                "CREATE SCHEMA app; CREATE TABLE app.items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text)"
            )
            ddl.track(conn, "app.items")
            t0 = time.monotonic()
            fill(conn)
            fill_s = time.monotonic() - t0
        baseline = write_latencies(dsn, threading.Event(), seconds=5)
        stop = threading.Event()
        during: list[float] = []
        writer = threading.Thread(target=lambda: during.extend(write_latencies(dsn, stop)))
        writer.start()
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            result = retention.purge(conn, "90d", batch_size=BATCH)
        stop.set()
        writer.join()
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM threadline.changes WHERE table_name = 'items' AND after->>'name' <> 'live'"
            ).fetchone()
    print(f"filled {ROWS} changes in {ROWS // PER_TX} transactions ({fill_s:.1f} s); batch size {BATCH}\n")
    print("| purge | rows | seconds | rows/s |")
    print("|---|---:|---:|---:|")
    print(
        f"| changes + transactions | {result.changes + result.transactions} | {result.seconds:.1f} | "
        f"{(result.changes + result.transactions) / result.seconds:.0f} |"
    )
    print(
        f"\n({result.changes} changes, {result.transactions} transactions, {result.batches} batches; "
        f"old changes left: {left[0] if left else '?'})\n"
    )
    print("| audited single-row write, ms | p50 | p95 | p99 | max | writes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in (("alone", baseline), ("during purge", during)):
        print(
            f"| {name} | {pct(values, 50):.2f} | {pct(values, 95):.2f} | {pct(values, 99):.2f} | "
            f"{max(values):.2f} | {len(values)} |"
        )


if __name__ == "__main__":
    main()
