"""Where the audit bytes go, relation by relation (`make bench-storage`).

Creates its own database, installs the audit store as a new install does (partitioned by month;
BENCH_LAYOUT=plain for plain tables), tracks the capture benchmark's 8-column table and writes,
each transaction with a context of its own (its own correlation id, as web requests have),
STORAGE_SINGLE single-row UPDATE transactions and STORAGE_MULTI transactions of ten updates.
After VACUUM it prints the size of each relation of `changes`, `transactions` and `truncates`
(summed over partitions), per change, and the average size of the stored values; then drops the
database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench._db import scratch_database  # noqa: E402
from bench.capture import SETUP, TABLE_ROWS  # noqa: E402
from threadline import ddl  # noqa: E402

SINGLE = int(os.environ.get("STORAGE_SINGLE", "30000"))
MULTI = int(os.environ.get("STORAGE_MULTI", "3000"))

# a procedure commits each transaction itself, so the load needs no round trip per transaction
LOAD = """
CREATE PROCEDURE public.bench_load(n int, per int, first int) LANGUAGE plpgsql AS $$
DECLARE i int; k int;
BEGIN
  FOR i IN first .. first + n - 1 LOOP
    PERFORM set_config('threadline.context',
        '{"actor":{"id":"' || (i % 500) || '","type":"user"},"correlation_id":"'
        || md5(i::text) || '","v":1}', true);
    FOR k IN 1 .. per LOOP
      UPDATE public.items SET a = a + 1 WHERE id = 1 + ((i * 7919 + k * 104729) % (@rows@ - 1));
    END LOOP;
    COMMIT;
  END LOOP;
END $$;
"""

# each relation of the audit tables that capture writes (a partitioned one summed over its
# partitions, its indexes likewise), in bytes
SIZES = """
SELECT r.relname::text, CASE WHEN r.relkind IN ('i', 'I') THEN 'index' ELSE 'table' END,
       CASE WHEN r.relkind IN ('p', 'I')
            THEN (SELECT sum(pg_relation_size(t.relid)) FROM pg_partition_tree(r.oid) t WHERE t.isleaf)
            ELSE pg_relation_size(r.oid) END
  FROM pg_class r
  JOIN pg_namespace n ON n.oid = r.relnamespace
  LEFT JOIN pg_index i ON i.indexrelid = r.oid
  JOIN pg_class owner ON owner.oid = coalesce(i.indrelid, r.oid)
 WHERE n.nspname = 'threadline' AND NOT r.relispartition AND r.relkind IN ('r', 'p', 'i', 'I')
   AND owner.relname IN ('changes', 'transactions', 'truncates')
 ORDER BY 3 DESC, 1
"""


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def main() -> None:
    layout = os.environ.get("BENCH_LAYOUT", "month")
    with scratch_database("threadline_storage") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP.format(t="items", n=TABLE_ROWS).encode())
        ddl.install(conn, partition_by=None if layout == "plain" else layout)
        ddl.track(conn, "items")
        conn.execute(LOAD.replace("@rows@", str(TABLE_ROWS)).encode())
        conn.execute("CALL public.bench_load(%s, 1, 1)", [SINGLE])
        conn.execute("CALL public.bench_load(%s, 10, %s)", [MULTI, SINGLE + 1])
        conn.execute("VACUUM ANALYZE")
        changes = int(_one(conn, "SELECT count(*) FROM threadline.changes"))
        transactions = int(_one(conn, "SELECT count(*) FROM threadline.transactions"))
        print(
            f"# Audit bytes per change ({'plain tables' if layout == 'plain' else 'partitioned by ' + layout})\n\n"
            f"{SINGLE:,} single-row UPDATE transactions and {MULTI:,} of ten updates: {changes:,} changes"
            f" in {transactions:,} transactions, each with its own correlation id; 500 actors.\n"
        )
        print("| relation | kind | bytes | bytes per change |\n|---|---|---:|---:|")
        total = 0
        for name, kind, size in conn.execute(SIZES).fetchall():
            total += size
            print(f"| `{name}` | {kind} | {size:,} | {size / changes:,.1f} |")
        print(f"| **all** | | {total:,} | {total / changes:,.1f} |\n")
        row = conn.execute(
            "SELECT avg(pg_column_size(c.*)), avg(pg_column_size(c.before)), avg(pg_column_size(c.after)),"
            " avg(pg_column_size(c.pk)) FROM threadline.changes c"
        ).fetchone()
        tx_row = _one(conn, "SELECT avg(pg_column_size(t.*)) FROM threadline.transactions t")
        assert row is not None
        print(
            f"Average stored sizes: a change row {row[0]:.0f} bytes (before image {row[1]:.0f}, after image"
            f" {row[2]:.0f}, key {row[3]:.0f}); a transaction row {tx_row:.0f} bytes."
        )


if __name__ == "__main__":
    main()
