"""Query benchmark: run with `make bench-query` (or `python bench/query.py`).

Creates its own database (admin DSN from $THREADLINE_DSN, default the loopback PostgreSQL), fills
two audit schemas with generated history straight into the audit tables (`generate_series`, no
triggers; partitioned by month as a new install makes them, the history over last month), measures the Python API end to end, prints a Markdown report and drops the database.

Data, per set (the 1M set is the one the targets name; the 100k set keeps every per-entity
density equal, so only the table size changes between the two; the third set is the 1M set again
with the candidate indexes added):

| set | changes | transactions | correlation ids | actors | tables | rows per table |
|---|---:|---:|---:|---:|---:|---:|
| 100k | 100,000 | 10,000 | 500 | 100 | 20 | 500 |
| 1M | 1,000,000 | 100,000 | 5,000 | 1,000 | 20 | 5,000 |
| 1M + candidate indexes | 1,000,000 | 100,000 | 5,000 | 1,000 | 20 | 5,000 |

Each correlation id is one web request followed by 19 Celery task transactions, 10 changes each
(200 changes); each row has 10 changes (an insert, updates, a delete for one row in ten) spread
over 30 days; each actor has 100 transactions.

Measured, the three sets side by side (sample by sample, so load on the machine falls on all of
them alike), medians of BENCH_SAMPLES calls with random arguments after a warm-up:

- `timeline(correlation_id=...)` (first page of 100 of the id's 200 changes);
- `history(table, pk)`; `as_of(table, pk, at)` at a random time;
- `actor_history(actor, since, until)` over a one-day window around one of the actor's requests;
- informational: `timeline(table=...)` without a correlation id;
- `export(format="ndjson")` of every row, in a child process: rows/s and its peak RSS (the
  server-side cursor path, CSV and JSON for information), the runs taking turns;
- the plans (`EXPLAIN ANALYZE`) of the statements that read `changes`, asserting no sequential scan;
- the cost of each candidate index on capture, with pgbench: single-row INSERT transactions into a
  tracked table of the 1M set, TPS and WAL bytes per transaction, rounds in rotating order.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

import threadline
from threadline import ddl
from threadline.core import _run
from threadline.explore import as_of_row, timeline_query
from threadline.explore import query as q
from threadline.explore.as_of_query import AsOfError
from threadline.explore.export_rows import chunked_streaming
from threadline.ops.partitions import create_partitions

ADMIN_DSN = os.environ.get("THREADLINE_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SAMPLES = int(os.environ.get("BENCH_SAMPLES", "200"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
CAPTURE_ROUNDS = int(os.environ.get("BENCH_CAPTURE_ROUNDS", "6"))
ONLY = os.environ.get("BENCH_ONLY", "")
"""``capture`` measures only the capture cost of the candidate indexes."""
EXPORT_RUNS = int(os.environ.get("BENCH_EXPORT_RUNS", "3"))
BASE = (
    datetime.now(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
).replace(day=1)
"""The history starts on the first of last month: a month-partitioned store then holds it in two
partitions beside those a new install makes, as a store a month old does."""
SPAN = timedelta(days=30)
TABLES = [f"t{i:02d}" for i in range(1, 21)]


@dataclass(frozen=True)
class Size:
    """One generated data set in its own audit schema."""

    label: str
    schema: str
    transactions: int
    correlations: int
    actors: int

    @property
    def changes(self) -> int:
        return self.transactions * 10

    @property
    def rows_per_table(self) -> int:
        return self.changes // len(TABLES) // 10


SIZES = [
    Size("100k", "bench_100k", 10_000, 500, 100),
    Size("1M", "bench_1m", 100_000, 5_000, 1_000),
    Size("1M + candidate indexes", "bench_1m_idx", 100_000, 5_000, 1_000),
]
"""The last set is the 1M set again, with every candidate index: the sets are measured side by
side (sample by sample), so load on the machine falls on all of them alike."""

CANDIDATES = {
    "time": "CREATE INDEX {name} ON {schema}.changes (captured_at, id)",
}
"""Candidate indexes, measured for what they give the queries and cost the capture."""

TRANSACTIONS_SQL = """
INSERT INTO {a}.transactions (occurred_at, actor, correlation_id, request_id, causation_id, origin, job)
SELECT %(base)s::timestamptz + (g - 1) * (%(span)s::interval / %(n)s),
       jsonb_build_object('type', 'user', 'id', ((corr * 7919) %% %(actors)s)::text),
       'corr-' || corr,
       'req-' || corr,
       CASE WHEN pos = 0 THEN NULL
            WHEN pos = 1 THEN 'req-' || corr
            ELSE 'task-' || corr || '-' || ((pos - 2) / 3 + 2) END,
       CASE WHEN pos = 0 THEN 'web' ELSE 'celery' END,
       CASE WHEN pos > 0 THEN jsonb_build_object(
            'name', 'app.tasks.step' || (pos %% 4),
            'id', 'task-' || corr || '-' || (pos + 1),
            'retries', 0,
            'parent_id', CASE WHEN pos > 1 THEN 'task-' || corr || '-' || ((pos - 2) / 3 + 2) END,
            'root_id', 'task-' || corr || '-2') END
  FROM (SELECT g, (g - 1) / 20 AS corr, (g - 1) %% 20 AS pos FROM generate_series(1, %(n)s) g) s
 ORDER BY g
"""

CHANGES_SQL = """
INSERT INTO {a}.changes
    (transaction_id, table_schema, table_name, op, pk, after, before, changed_fields, captured_at{occurred})
SELECT tx, 'app', 't' || lpad((n %% 20 + 1)::text, 2, '0'),
       CASE WHEN v = 0 THEN 'insert' WHEN gone THEN 'delete' ELSE 'update' END,
       jsonb_build_object('id', r),
       CASE WHEN NOT gone THEN jsonb_build_object(
            'id', r, 'title', 'title ' || v, 'body', md5(r::text || v), 'views', v, 'status', 'live') END,
       CASE WHEN v = 0 THEN NULL
            WHEN gone THEN jsonb_build_object(
                'id', r, 'title', 'title 8', 'body', md5(r::text || 8), 'views', 8, 'status', 'live')
            ELSE jsonb_build_object('title', 'title ' || (v - 1), 'views', v - 1) END,
       CASE WHEN v > 0 AND NOT gone THEN ARRAY['title', 'views'] END,
       %(base)s::timestamptz + (tx - 1) * (%(span)s::interval / %(n)s) + (n %% 10) * interval '1 ms'{started}
  FROM (SELECT n, n / 10 + 1 AS tx, (n / 20) %% %(rows)s + 1 AS r, (n / 20) / %(rows)s AS v,
               (n / 20) / %(rows)s = 9 AND ((n / 20) %% %(rows)s + 1) %% 10 = 0 AS gone
          FROM generate_series(0, %(n)s * 10 - 1) n) s
 ORDER BY n
"""


def generate(conn: psycopg.Connection[Any], size: Size) -> None:
    """Install ``size.schema`` and fill it (triggers off: the rows are written as given)."""
    ddl.install(conn, size.schema)
    for table in TABLES:
        ddl.track(conn, f"app.{table}", audit_schema=size.schema)
    a = sql.Identifier(size.schema)
    params = {
        "base": BASE,
        "span": SPAN,
        "n": size.transactions,
        "actors": size.actors,
        "rows": size.rows_per_table,
    }
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql.SQL(TRANSACTIONS_SQL).format(a=a), params)
        # a partitioned store keys a change by its transaction's start as well (the partition key)
        partitioned = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'occurred_at'",
            (f"{size.schema}.changes",),
        ).fetchone()
        extra = (
            {
                "occurred": sql.SQL(", occurred_at"),
                "started": sql.SQL(
                    ",\n       %(base)s::timestamptz + (tx - 1) * (%(span)s::interval / %(n)s)"
                ),
            }
            if partitioned
            else {"occurred": sql.SQL(""), "started": sql.SQL("")}
        )
        conn.execute(sql.SQL(CHANGES_SQL).format(a=a, **extra), params)
    if partitioned:  # the generated month has a partition of its own, as in a live store
        create_partitions(conn, since=BASE, audit_schema=size.schema)
    conn.execute(sql.SQL("VACUUM ANALYZE {}.transactions").format(a))
    conn.execute(sql.SQL("VACUUM ANALYZE {}.changes").format(a))


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Timing:
    median_ms: float
    p95_ms: float
    rows: float


def _timing(times: list[float], rows: int) -> Timing:
    times = sorted(times)
    return Timing(statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], rows / len(times))


def measure(calls: dict[str, Callable[[int], int]], samples: int = SAMPLES) -> dict[str, Timing]:
    """Median and p95 of each ``call(i)`` (which returns how many rows it got), the calls taking
    turns sample by sample after a warm-up."""
    for i in range(max(10, samples // 10)):
        for call in calls.values():
            call(i)
    times: dict[str, list[float]] = {label: [] for label in calls}
    rows = dict.fromkeys(calls, 0)
    for i in range(samples):
        for label, call in calls.items():
            start = time.perf_counter()
            rows[label] += call(i)
            times[label].append((time.perf_counter() - start) * 1000)
    return {label: _timing(times[label], rows[label]) for label in calls}


def _calls(
    conn: psycopg.Connection[Any], size: Size, n: int, seed: int = 7
) -> dict[str, Callable[[int], int]]:
    """The measured calls on one set, with random arguments (the same for sets of one size)."""
    rng = random.Random(seed)
    corr = [f"corr-{rng.randrange(size.correlations)}" for _ in range(n)]
    rows = [(f"app.{rng.choice(TABLES)}", rng.randrange(1, size.rows_per_table + 1)) for _ in range(n)]
    times = [BASE + SPAN * rng.random() for _ in range(n)]
    actor_windows = []
    for _ in range(n):
        g = rng.randrange(1, size.transactions + 1)
        actor = f"user:{(((g - 1) // 20) * 7919) % size.actors}"
        at = BASE + (g - 1) * (SPAN / size.transactions)
        actor_windows.append((actor, at - timedelta(hours=12), at + timedelta(hours=12)))
    s = size.schema

    def timeline(i: int) -> int:
        return len(threadline.timeline(conn, correlation_id=corr[i], audit_schema=s))

    def history(i: int) -> int:
        return len(threadline.history(conn, rows[i][0], rows[i][1], audit_schema=s))

    def as_of(i: int) -> int:
        try:
            threadline.as_of(conn, rows[i][0], rows[i][1], times[i], audit_schema=s)
        except AsOfError:
            return 0
        return 1

    def actor_history(i: int) -> int:
        actor, since, until = actor_windows[i]
        return len(threadline.actor_history(conn, actor, since, until, audit_schema=s))

    def table_timeline(i: int) -> int:
        return len(threadline.timeline(conn, table=rows[i][0], audit_schema=s))

    return {
        "timeline(correlation_id)": timeline,
        "history(table, pk)": history,
        "as_of(table, pk, at)": as_of,
        "actor_history(1 day)": actor_history,
        "timeline(table) first page": table_timeline,
    }


def lookups(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Timing]]:
    """``{call: {set label: Timing}}``, every set measured side by side."""
    n = SAMPLES + max(10, SAMPLES // 10)
    per_set = {size.label: _calls(conn, size, n) for size in SIZES}
    out: dict[str, dict[str, Timing]] = {}
    for call in per_set[SIZES[0].label]:
        samples = max(20, SAMPLES // 10) if call.startswith("timeline(table)") else SAMPLES
        out[call] = measure({label: calls[call] for label, calls in per_set.items()}, samples)
        print(f"measured {call}", file=sys.stderr)
    return out


EXPORT_CHILD = """
import os, sys, time
import psycopg
import threadline
dsn, schema, fmt, how = sys.argv[1:5]
with psycopg.connect(dsn, autocommit=True) as conn, open(os.devnull, "w") as out:
    start = time.perf_counter()
    rows = threadline.export(conn, out, fmt, audit_schema=schema, server_cursor=how == "cursor" or None)
    seconds = time.perf_counter() - start
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(rows, seconds, int(peak) * 1024)
"""


def export_runs(
    dsn: str, jobs: list[tuple[str, Size, str, str]], runs: int
) -> dict[str, tuple[int, float, int]]:
    """Rows, seconds (median of ``runs``) and peak RSS (bytes, the largest) of a child process
    exporting every row, per job; the jobs take turns."""
    results: dict[str, list[tuple[int, float, int]]] = {label: [] for label, _, _, _ in jobs}
    for _ in range(runs):
        for label, size, fmt, how in jobs:
            out = subprocess.run(
                [sys.executable, "-c", EXPORT_CHILD, dsn, size.schema, fmt, how],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            results[label].append((int(out[0]), float(out[1]), int(out[2])))
    return {
        label: (r[0][0], statistics.median(x[1] for x in r), max(x[2] for x in r))
        for label, r in results.items()
    }


def explain(conn: psycopg.Connection[Any], plan: _run.Plan[Any]) -> str:
    """Run ``plan``; return the EXPLAIN ANALYZE of its statement that reads ``changes``."""
    last = ""
    try:
        query = next(plan)
        while True:
            text = conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ") + query.statement,
                query.params,
            ).fetchall()
            shown = "\n".join(r[0] for r in text)
            if re.search(r" on changes(?:_\w+)?\b", shown):  # the table or one of its partitions
                last = shown
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query.statement, query.params)
                rows = cur.fetchall() if cur.description else []
            query = plan.send(rows)
    except (StopIteration, AsOfError):
        pass
    return last


_NODE_RE = re.compile(r"^(\s*)(->\s*)?([A-Z][A-Za-z ]+?(?: using \S+)?(?: on \S+(?: \S+)?)?)(?: \(|$)")


def plan_nodes(text: str) -> list[str]:
    """The plan's node lines, compacted (no estimates, no filters)."""
    out = []
    for line in text.splitlines():
        m = _NODE_RE.match(line)
        if m and not line.strip().startswith(("Sort Key", "Index Cond", "Filter", "Recheck", "Rows", "Heap")):
            out.append(m.group(1) + (m.group(2) or "") + m.group(3))
    return out


def explains(conn: psycopg.Connection[Any], size: Size) -> dict[str, str]:
    s = size.schema
    at = BASE + timedelta(days=17, hours=5)
    return {
        "timeline(correlation_id)": explain(
            conn, timeline_query._timeline_plan("corr-1234", None, None, None, None, None, 100, None, s)
        ),
        "history(table, pk)": explain(conn, q._history_plan("app.t05", 321, None, s)),
        "as_of(table, pk, at)": explain(conn, as_of_row.row_as_of_plan("app.t05", 321, at, s)),
        "actor_history(1 day)": explain(
            conn,
            q._actor_history_plan("user:17", BASE + timedelta(days=10), BASE + timedelta(days=11), None, s),
        ),
        "timeline(table) first page": explain(
            conn, timeline_query._timeline_plan(None, "app.t05", None, None, None, None, 100, None, s)
        ),
    }


@contextmanager
def index(conn: psycopg.Connection[Any], size: Size, which: str) -> Iterator[None]:
    name = sql.Identifier(f"bench_{which}_idx")
    conn.execute(sql.SQL(CANDIDATES[which]).format(name=name, schema=sql.Identifier(size.schema)))
    conn.execute(sql.SQL("ANALYZE {}.changes").format(sql.Identifier(size.schema)))
    try:
        yield
    finally:
        conn.execute(sql.SQL("DROP INDEX {}.{}").format(sql.Identifier(size.schema), name))


def capture_cost(dsn: str, conn: psycopg.Connection[Any], size: Size) -> dict[str, tuple[float, float]]:
    """pgbench single-row INSERT transactions into a tracked table: TPS and WAL bytes per tx."""
    context = json.dumps({"v": 1, "actor": {"type": "user", "id": "42"}, "correlation_id": "bench"})
    # sequential keys: every insert lands on the rightmost index page, so the WAL per transaction
    # does not depend on how many random pages a run happens to touch first after a checkpoint
    conn.execute("CREATE SEQUENCE IF NOT EXISTS app.bench_ids START 1000000000")
    script = (
        "BEGIN;\nSELECT set_config('threadline.context', '" + context + "', true);\n"
        "INSERT INTO app.t01 (id, title, body, views, status) "
        "VALUES (nextval('app.bench_ids'), 't', 'b', 0, 'live');\nEND;\n"
    )
    # capture writes into the 1M set's audit schema only
    for other in SIZES:
        if other.schema != size.schema:
            for table in TABLES:
                ddl.untrack(conn, f"app.{table}", audit_schema=other.schema)
    configs = ["none", *CANDIDATES]
    tps: dict[str, list[float]] = {c: [] for c in configs}
    wal: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        for round_no in range(CAPTURE_ROUNDS):
            # rotate the order, so that no configuration always runs first after a drop or a build
            for config in configs[round_no % len(configs) :] + configs[: round_no % len(configs)]:
                with index(conn, size, config) if config != "none" else _nothing():
                    conn.execute("CHECKPOINT")
                    # a short warm-up takes the full-page images of the pages the run will touch
                    subprocess.run(
                        ["pgbench", "-n", "-c", "1", "-T", "1", "-f", f.name, dsn],
                        capture_output=True,
                        check=True,
                    )
                    lsn0 = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
                    out = subprocess.run(
                        ["pgbench", "-n", "-c", "1", "-T", str(SECONDS), "-f", f.name, dsn],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    row = conn.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", [lsn0[0] if lsn0 else None]
                    ).fetchone()
                    done = re.search(r"number of transactions actually processed: (\d+)", out)
                    rate = re.search(r"tps = ([0-9.]+)", out)
                    assert done and rate and row, out
                    tps[config].append(float(rate.group(1)))
                    wal[config].append(float(row[0]) / int(done.group(1)))
    finally:
        Path(f.name).unlink()
    return {c: (statistics.median(tps[c]), statistics.median(wal[c])) for c in configs}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------------------------
# Report


def main() -> None:
    name = f"threadline_bench_query_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)
    try:
        run(dsn)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _ms(t: Timing) -> str:
    return f"{t.median_ms:.2f}"


def run(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        conn.execute("CREATE SCHEMA app")
        for table in TABLES:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE app.{} (id bigint PRIMARY KEY, title text, body text, views int, status text)"
                ).format(sql.Identifier(table))
            )
        for size in SIZES:
            start = time.perf_counter()
            generate(conn, size)
            print(f"generated {size.label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        small, big, indexed = SIZES
        for which in CANDIDATES:
            conn.execute(
                sql.SQL(CANDIDATES[which]).format(
                    name=sql.Identifier(f"bench_{which}_idx"), schema=sql.Identifier(indexed.schema)
                )
            )
        conn.execute(sql.SQL("ANALYZE {}.changes").format(sql.Identifier(indexed.schema)))

        print(
            f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at the start. Medians of {SAMPLES} calls through the Python API "
            "(one local connection), milliseconds; the three sets measured side by side, sample by sample.\n"
        )
        if ONLY == "capture":
            _capture_report(dsn, conn, big)
            return
        results = lookups(conn)
        print(f"| call | {small.label} | {big.label} | {big.label} p95 | {indexed.label} | rows |")
        print("|---|---:|---:|---:|---:|---:|")
        for call, by_set in results.items():
            one, two, three = (by_set[s.label] for s in SIZES)
            print(
                f"| `{call}` | {_ms(one)} | {_ms(two)} | {two.p95_ms:.2f} | {_ms(three)} | {two.rows:.0f} |"
            )
        sys.stdout.flush()

        print(
            f"\n| export of every row (child process, median of {EXPORT_RUNS}; libpq {psycopg.pq.version()}) "
            "| rows | seconds | rows/s | peak RSS |"
        )
        print("|---|---:|---:|---:|---:|")
        how = "chunked" if chunked_streaming() else "cursor"
        jobs = [(f"NDJSON, {size.label}", size, "ndjson", how) for size in SIZES]
        jobs += [
            (f"NDJSON, {big.label}, server-side cursor", big, "ndjson", "cursor"),
            (f"CSV, {big.label}", big, "csv", how),
            (f"JSON, {big.label}", big, "json", how),
        ]
        for label, (rows, seconds, peak) in export_runs(dsn, jobs, EXPORT_RUNS).items():
            print(f"| {label} | {rows:,} | {seconds:.1f} | {rows / seconds:,.0f} | {peak / 2**20:.0f} MB |")
        sys.stdout.flush()

        print(
            f"\nPlans on the {big.label} set (EXPLAIN ANALYZE nodes of the statement that reads `changes`):\n"
        )
        # the partitions holding rows (the plain table, or the generated month's partition): an
        # empty partition may be read by a sequential scan, a full one may not
        held = {
            str(r[0]).split(".")[-1]
            for r in conn.execute(
                sql.SQL("SELECT DISTINCT tableoid::regclass FROM {}.changes").format(
                    sql.Identifier(big.schema)
                )
            )
        }
        for call, text in explains(conn, big).items():
            print(f"`{call}`:\n```\n" + "\n".join(plan_nodes(text)) + "\n```")
            scanned = set(re.findall(r"Seq Scan on (changes\w*)", text))
            assert not scanned & held, text
        _capture_report(dsn, conn, big)


def _capture_report(dsn: str, conn: psycopg.Connection[Any], big: Size) -> None:
    cost = capture_cost(dsn, conn, big)
    print("\nCapture cost of each candidate (pgbench, single-row INSERT transactions into a tracked")
    print(f"table of the 1M set, {CAPTURE_ROUNDS} rounds of {SECONDS} s in rotating order, medians):\n")
    print("| extra index | TPS | vs none | WAL bytes / tx |")
    print("|---|---:|---:|---:|")
    base = cost["none"][0]
    for config, (tps, wal) in cost.items():
        print(f"| {config} | {tps:.0f} | {tps / base:.2f}x | {wal:.0f} |")
    print(f"\nLoad average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
