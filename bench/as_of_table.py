"""Baseline and table as-of benchmark: run with ``python bench/as_of_table.py``.

Creates its own database (admin DSN from $THREADLINE_DSN, default the loopback PostgreSQL), writes
through the capture triggers, prints a Markdown report and drops the database.

- ``take_baseline`` of a 1,000,000-row table (BENCH_BASELINE_ROWS), batches of 10,000
  (BENCH_BATCH): seconds and rows/s.
- ``as_of(conn, table, at=...)`` of a table with 1,000,000 changes: a 200,000-row baseline
  (BENCH_HISTORY_ROWS) and 800,000 captured updates, inserts and deletes (20 rounds of 30,000
  updates, 5,000 inserts and 5,000 deletes), at the middle of the rounds and after the last one.
  Each run is a child process: time to the first row, total time, rows/s, and the growth of its
  peak RSS while streaming (then, for contrast, while building a list of every row). Measured
  before and after the 1M-row baseline above joins the same ``changes`` table.
- ``as_of(conn, table, pk, at)`` of random rows at random times, with the baseline present:
  median and p95 of BENCH_SAMPLES calls.
- ``EXPLAIN (ANALYZE, BUFFERS)`` of the table as-of statement, once.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench._db import scratch_database  # noqa: E402
from threadline import ddl, take_baseline  # noqa: E402
from threadline.core import _run  # noqa: E402
from threadline.explore import as_of_table  # noqa: E402
from threadline.explore.as_of_query import AsOfError, as_of  # noqa: E402

BASELINE_ROWS = int(os.environ.get("BENCH_BASELINE_ROWS", "1000000"))
BATCH = int(os.environ.get("BENCH_BATCH", "10000"))
HISTORY_ROWS = int(os.environ.get("BENCH_HISTORY_ROWS", "200000"))
ROUNDS = 20
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "500"))
PLAN_LINES = int(os.environ.get("BENCH_PLAN_LINES", "40"))

STREAM_CHILD = """
import json, sys, time
import psycopg
from datetime import datetime
from threadline import as_of  # noqa: E402

def peak():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024

dsn, table, at, how = sys.argv[1:5]
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute("SELECT 1")
    before = peak()
    start = time.perf_counter()
    rows = as_of(conn, table, at=datetime.fromisoformat(at))
    first = None
    count = 0
    kept = []
    for row in rows:
        if first is None:
            first = time.perf_counter() - start
        count += 1
        if how == "list":
            kept.append(row)
    total = time.perf_counter() - start
print(json.dumps({"rows": count, "first": first, "total": total, "growth": peak() - before}))
"""


def _now(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def baseline_time(conn: psycopg.Connection[Any]) -> tuple[float, int]:
    """Seconds and rows of the baseline of a fresh ``BASELINE_ROWS``-row table."""
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY, name text, qty int, price numeric(10, 2))")
    conn.execute(
        "INSERT INTO app.big SELECT g, 'item ' || g, g %% 100, g %% 1000 / 10.0 FROM generate_series(1, %s) g",
        [BASELINE_ROWS],
    )
    conn.execute("VACUUM ANALYZE app.big")
    ddl.track(conn, "app.big")
    start = time.perf_counter()
    result = take_baseline(conn, "app.big", batch_size=BATCH)
    return time.perf_counter() - start, result.rows


def history(conn: psycopg.Connection[Any]) -> tuple[datetime, datetime, int]:
    """``app.hist``: a baseline of ``HISTORY_ROWS`` rows, then rounds of captured writes; the
    middle and the end of the rounds, and the table's changes."""
    conn.execute(
        "CREATE TABLE app.hist (id int PRIMARY KEY, name text, qty int, price numeric(10, 2), updated timestamptz)"
    )
    conn.execute(
        "INSERT INTO app.hist SELECT g, 'item ' || g, g %% 100, g %% 1000 / 10.0, now()"
        " FROM generate_series(1, %s) g",
        [HISTORY_ROWS],
    )
    ddl.track(conn, "app.hist")
    take_baseline(conn, "app.hist", batch_size=BATCH)
    updates = HISTORY_ROWS * 3 // 20  # three residues of id % 20 per round
    inserts = deletes = updates // 6
    middle = None
    for r in range(ROUNDS):
        conn.execute(
            "UPDATE app.hist SET qty = qty + 1, updated = clock_timestamp()"
            " WHERE id IN (SELECT id FROM app.hist WHERE id %% 20 IN (%s, %s, %s) ORDER BY id LIMIT %s)",
            [r, (r + 7) % 20, (r + 13) % 20, updates],
        )
        conn.execute(
            "INSERT INTO app.hist SELECT %s + g, 'new ' || g, 0, 1.0, clock_timestamp()"
            " FROM generate_series(1, %s) g",
            [10 * HISTORY_ROWS + r * inserts, inserts],
        )
        conn.execute(
            "DELETE FROM app.hist WHERE id IN"
            " (SELECT id FROM app.hist WHERE id %% 20 = %s AND id <= %s ORDER BY id DESC LIMIT %s)",
            [(r + 3) % 20, HISTORY_ROWS, deletes],
        )
        if r == ROUNDS // 2 - 1:
            middle = _now(conn)
    assert middle is not None
    conn.execute("VACUUM ANALYZE threadline.changes, threadline.transactions")
    row = conn.execute("SELECT count(*) FROM threadline.changes WHERE table_name = 'hist'").fetchone()
    assert row is not None
    return middle, _now(conn), row[0]


def stream(dsn: str, table: str, at: datetime, how: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", STREAM_CHILD, dsn, table, at.isoformat(), how],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def row_lookups(conn: psycopg.Connection[Any], since: datetime, until: datetime) -> tuple[float, float, int]:
    """Median and p95 (ms) of ``as_of(table, pk, at)`` of random rows at random times, and how
    many of them were known (the others: deleted, or not inserted yet)."""
    rng = random.Random(7)
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT (pk ->> 'id')::int FROM threadline.changes WHERE table_name = 'hist' GROUP BY 1"
        )
    ]
    span = (until - since).total_seconds()
    times: list[float] = []
    known = 0
    for i in range(SAMPLES + 20):
        key = rng.choice(ids)
        at = since + (until - since) * rng.random() if span else until
        start = time.perf_counter()
        try:
            as_of(conn, "app.hist", key, at)
            found = True
        except AsOfError:
            found = False
        if i >= 20:  # after a warm-up
            times.append((time.perf_counter() - start) * 1000)
            known += found
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], known


def explain(conn: psycopg.Connection[Any], at: datetime) -> list[str]:
    statement, params = _run.run(conn, as_of_table.table_as_of_plan("app.hist", at, "threadline"))
    rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + statement, params).fetchall()
    return [r[0] for r in rows]


def _stream_row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {r['rows']:,} | {r['first']:.2f} s | {r['total']:.2f} s | {r['rows'] / r['total']:,.0f} |"
        f" {r['growth'] / 2**20:.1f} MB |"
    )


def main() -> None:
    with scratch_database("threadline_bench_as_of") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        ddl.install(conn)
        conn.execute("CREATE SCHEMA app")
        version = conn.execute("SHOW server_version").fetchone()
        work_mem = conn.execute("SHOW work_mem").fetchone()
        start = time.perf_counter()
        middle, end, hist_changes = history(conn)
        print(f"generated app.hist: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runs = [
            (f"middle, {hist_changes:,} changes in the log", stream(dsn, "app.hist", middle, "stream")),
            (f"end, {hist_changes:,} changes in the log", stream(dsn, "app.hist", end, "stream")),
            ("end, every row kept in a list", stream(dsn, "app.hist", end, "list")),
        ]
        p50, p95, known = row_lookups(conn, middle - (end - middle), end)
        plan = explain(conn, middle)
        seconds, rows = baseline_time(conn)
        total = conn.execute("SELECT count(*) FROM threadline.changes").fetchone()
        assert total is not None
        conn.execute("VACUUM ANALYZE threadline.changes")
        runs.append((f"end, {total[0]:,} changes in the log", stream(dsn, "app.hist", end, "stream")))

    print(
        f"PostgreSQL {version[0] if version else '?'} (work_mem {work_mem[0] if work_mem else '?'}),"
        f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end.\n"
    )
    print("| baseline | rows | batch | seconds | rows/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| `take_baseline` | {rows:,} | {BATCH:,} | {seconds:.1f} | {rows / seconds:,.0f} |")
    print(
        f"\n`as_of(conn, 'app.hist', at=...)`: {HISTORY_ROWS:,}-row baseline and {hist_changes - HISTORY_ROWS:,}"
        " captured changes; each run a child process\n"
    )
    print("| at | rows | first row | total | rows/s | peak RSS growth |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, result in runs:
        print(_stream_row(label, result))
    print(
        f"\n`as_of(conn, 'app.hist', pk, at)`, random rows and times, baseline present: p50 {p50:.2f} ms,"
        f" p95 {p95:.2f} ms ({known} of {SAMPLES} known, the others deleted or not inserted yet)\n"
    )
    print(f"EXPLAIN (ANALYZE, BUFFERS) of the table statement at the middle (first {PLAN_LINES} lines):\n")
    print("```\n" + "\n".join(plan[:PLAN_LINES]) + "\n```")


if __name__ == "__main__":
    main()
