"""Load benchmark: 8 concurrent writers x 10,000 transactions, each with its own context.

Run with ``make bench-ops`` (or ``python bench/load.py``; LOAD_WRITERS / LOAD_TRANSACTIONS change
the size). Each transaction inserts a row and updates it on a tracked table through a
ThreadlineConnection (automatic context mode). Afterwards every change is checked: the count
equals the writes made and each change's transaction carries its own writer's context. Reports
throughput against the same workload on an untracked table, measured in the same run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench._db import scratch_database  # noqa: E402
from tests.load_writers import check, run_writers, setup  # noqa: E402
from threadline import ddl  # noqa: E402

WRITERS = int(os.environ.get("LOAD_WRITERS", "8"))
TRANSACTIONS = int(os.environ.get("LOAD_TRANSACTIONS", "10000"))


def main() -> None:
    with scratch_database("threadline_bench_load") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn)
            version = conn.execute("SHOW server_version").fetchone()
        setup(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.untrack(conn, "load.items")
        plain = run_writers(dsn, WRITERS, TRANSACTIONS)
        setup(dsn)
        audited = run_writers(dsn, WRITERS, TRANSACTIONS)
        counts = check(dsn, WRITERS, TRANSACTIONS)
    total = WRITERS * TRANSACTIONS
    print(f"PostgreSQL {version[0] if version else '?'}, {os.cpu_count()} cores")
    print(f"{WRITERS} writers x {TRANSACTIONS} transactions (insert + update each), distinct contexts\n")
    print("| table | seconds | transactions/s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| untracked | {plain:.1f} | {total / plain:.0f} | 1.00x |")
    print(f"| tracked (threadline) | {audited:.1f} | {total / audited:.0f} | {plain / audited:.2f}x |")
    print(
        f"\nchecked: {counts['changes']} changes in {counts['transactions']} transactions, "
        "0 missing, 0 misattributed"
    )


if __name__ == "__main__":
    main()
