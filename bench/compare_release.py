"""Capture cost of this checkout against a previous release, side by side in one database.

    git worktree add /tmp/previous <commit>
    python bench/compare_release.py /tmp/previous

The previous release's schema is installed (by that release's own code, in a subprocess) as the
audit schema ``previous`` and tracks ``t_prev``; this checkout's schema ``threadline`` tracks
``t_tl`` with typed capture code and ``t_tld`` with drift-safe code. The same workloads then run
on the three tables and on an untriggered ``t_plain`` in interleaved rounds: single-row UPDATE
transactions (pgbench, 1 client) and one statement inserting, updating and deleting 10,000 rows.
Prints a Markdown report; the figures are medians of the rounds, as ratios in the same run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench.capture import (  # noqa: E402
    PGBENCH,
    SETUP,
    TABLE_ROWS,
    bulk_medians,
    pgbench_tps,
    track_drift_safe,
)
from threadline import ddl  # noqa: E402

ADMIN_DSN = os.environ.get("THREADLINE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
TABLES = {"t_plain": "no trigger", "t_prev": "previous release", "t_tl": "this checkout (typed)"}
TABLES["t_tld"] = "this checkout (drift-safe)"

_INSTALL_PREVIOUS = """
import sys
sys.path.insert(0, sys.argv[1])
import psycopg
import threadline
assert threadline.__file__.startswith(sys.argv[1]), threadline.__file__
from threadline import ddl
with psycopg.connect(sys.argv[2], autocommit=True) as conn:
    ddl.install(conn, "previous")
    ddl.track(conn, "t_prev", audit_schema="previous")
    print(ddl.SCHEMA_VERSION)
"""


def main() -> None:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "threadline").is_dir():
        sys.exit("usage: compare_release.py <checkout of the previous release>")
    previous = str(Path(sys.argv[1]).resolve())
    name = f"threadline_compare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in TABLES:
                conn.execute(SETUP.format(t=table, n=TABLE_ROWS).encode())
            old = subprocess.run(
                [sys.executable, "-c", _INSTALL_PREVIOUS, previous, dsn],
                capture_output=True,
                text=True,
                check=True,
                cwd="/",
            ).stdout.strip()
            ddl.install(conn)
            ddl.track(conn, "t_tl")
            track_drift_safe(conn, "t_tld")
            conn.execute("VACUUM ANALYZE")
        report(dsn, old)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def report(dsn: str, old_version: str) -> None:
    print(
        f"# Capture: schema v{old_version} (previous release) vs v{ddl.SCHEMA_VERSION} (this checkout)\n\n"
        f"{os.cpu_count()} cores, {ROUNDS} interleaved rounds, medians.\n"
    )
    print("| workload | no trigger | " + " | ".join(list(TABLES.values())[1:]) + " |")
    print("|---|---:|---:|---:|---:|")
    template = PGBENCH["single-row UPDATE"]
    tps: dict[str, list[float]] = {t: [] for t in TABLES}
    for _ in range(ROUNDS):
        for table in tps:
            tps[table].append(pgbench_tps(dsn, template.replace("{t}", table)))
    base = statistics.median(tps["t_plain"])
    cells = " | ".join(f"{statistics.median(tps[t]) / base:.2f}x" for t in list(TABLES)[1:])
    print(f"| single-row UPDATE (TPS as a fraction of no trigger) | {base:.0f} TPS | {cells} |")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for op in ("INSERT", "UPDATE", "DELETE"):
            med = bulk_medians(conn, tuple(TABLES), op, ROUNDS)
            cells = " | ".join(f"{med[t]:.0f} ms" for t in list(TABLES)[1:])
            print(f"| one statement: {op} of 10,000 rows | {med['t_plain']:.0f} ms | {cells} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
