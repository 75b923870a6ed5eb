"""Seal, verify, erase and revert at scale: run with `python bench/seal.py` (N transactions: $BENCH_SEAL_TX,
default 100,000).

Creates its own database, writes N audited transactions through the real capture path (a
procedure that commits after each: one insert and, for every other one, an update, so about 1.5
changes per transaction), then measures: sealing them all (transactions/s, seals table bytes per
transaction), verifying the chain (transactions/s), the same verify after one audit row was edited
(it must name that transaction), erasing one actor's identifiers (pseudonymised) with the
erasure link it appends, and reverting a request that inserted, updated and deleted 1,000 rows
each (dry run, then applied). Prints a Markdown table and drops the database.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import threadline
from bench._db import scratch_database
from threadline.ops.erasure import erase
from threadline.ops.seal import seal, verify

N = int(os.environ.get("BENCH_SEAL_TX", "100000"))

WRITE = """
CREATE PROCEDURE app_write(n integer) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. n LOOP
        PERFORM set_config('threadline.context',
            format('{"v":1,"actor":{"type":"user","id":"%s"},"correlation_id":"req-%s"}', i % 1000, i), true);
        INSERT INTO people VALUES (i, 'person' || i || '@example.com', 'Name ' || i);
        IF i % 2 = 0 THEN
            UPDATE people SET name = 'Renamed ' || i WHERE id = i;
        END IF;
        COMMIT;
    END LOOP;
END $$;
"""


def main() -> None:
    with scratch_database("tl_bench_seal") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        threadline.ddl.install(conn)
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, email text, name text)")
        threadline.ddl.track(conn, "people")
        conn.execute(WRITE)
        started = time.perf_counter()
        conn.execute("CALL app_write(%s)", [N])
        write_s = time.perf_counter() - started
        changes = conn.execute("SELECT count(*) FROM threadline.changes").fetchone()
        started = time.perf_counter()
        sealed = seal(conn, batch_size=1000)
        seal_s = time.perf_counter() - started
        size = conn.execute("SELECT pg_total_relation_size('threadline.seals')").fetchone()
        started = time.perf_counter()
        checked = verify(conn, expect_head=sealed.head)
        verify_s = time.perf_counter() - started
        assert checked.ok, checked.problems
        victim = conn.execute(
            "SELECT id FROM threadline.transactions ORDER BY xid, id OFFSET %s LIMIT 1", [N // 2]
        ).fetchone()
        assert victim is not None
        conn.execute("UPDATE threadline.changes SET after = '{}' WHERE transaction_id = %s", [victim[0]])
        started = time.perf_counter()
        tampered = verify(conn)
        tampered_s = time.perf_counter() - started
        assert tampered.problem_transaction == victim[0], tampered.problems
        started = time.perf_counter()
        erased = erase(conn, actor="user:7", policy="pseudonymise", key="bench", reason="bench")
        erase_s = time.perf_counter() - started
        assert changes is not None and size is not None
        print(f"| measure ({N:,} transactions, {changes[0]:,} changes) | figure |")
        print("|---|---:|")
        print(f"| write through capture | {N / write_s:,.0f} transactions/s |")
        print(
            f"| seal (1,000 per seal) | {sealed.transactions / seal_s:,.0f} transactions/s ({seal_s:.1f} s) |"
        )
        print(f"| seals table | {size[0] / sealed.transactions:.0f} bytes per transaction |")
        print(f"| verify (ok) | {checked.transactions / verify_s:,.0f} transactions/s ({verify_s:.1f} s) |")
        print(f"| verify (one change edited: named) | {tampered_s:.1f} s |")
        print(
            f"| erase one actor ({erased.transactions} transactions, pseudonymised, erasure link) | {erase_s * 1000:.0f} ms |"
        )
        # a request that inserted, updated and deleted REVERT_ROWS rows, then its revert
        rows = 1000
        with threadline.context(actor="user:1", correlation_id="req-revert"), threadline.transaction(conn):
            conn.execute(
                "INSERT INTO people SELECT g, 'r' || g, 'R' FROM generate_series(%s::int, %s::int) g",
                [N + 1, N + rows],
            )
            conn.execute("UPDATE people SET name = 'changed' WHERE id <= %s", [rows])
            conn.execute("DELETE FROM people WHERE id > %s AND id <= %s", [rows, 2 * rows])
        started = time.perf_counter()
        planned = threadline.revert(conn, correlation_id="req-revert", dry_run=True)
        plan_s = time.perf_counter() - started
        started = time.perf_counter()
        done = threadline.revert(conn, correlation_id="req-revert")
        revert_s = time.perf_counter() - started
        assert len(done.plan.steps) == 3 * rows == len(planned.plan.steps)
        print(f"| revert dry run ({3 * rows:,} rows: inserted, updated, deleted) | {plan_s * 1000:.0f} ms |")
        print(f"| revert ({3 * rows:,} rows, one transaction) | {revert_s * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
