"""What the key index of ``changes`` costs, against the hash index on ``pk`` it replaced
(`make bench-key-index`).

Counted with valgrind in a single-user backend, as `make bench-instructions` does, on audit
tables grown by ``GROW`` full-table updates of a 100,000-row table (400,000 changes by default)
and holding ``HOT`` earlier changes of one row (200,000 by default):

- one 10,000-row INSERT, UPDATE and DELETE statement, as a multiple of the statement-level floor
  trigger (`bench/capture.py`);
- one single-row UPDATE transaction of the row with many changes, and of a row with few.

A hash index keeps every entry of one key in one bucket chain, which each new entry walks to its
end; the btree on the key's hash finds its place in a few pages however often a row changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench.capture import CONTEXT, FLOOR_STATEMENT, SETUP, TABLE_ROWS  # noqa: E402
from bench.capture_instructions import count_script, pristine_cluster, scratch_root, valgrind_server  # noqa: E402
from threadline import ddl  # noqa: E402

GROW = int(os.environ.get("GROW", "4"))
HOT = int(os.environ.get("HOT", "200000"))
ROWS = 10_000
SINGLE = 50
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "key": ("the key index (btree on jsonb_hash(pk))", []),
    "hash": (
        "a hash index on pk (before)",
        ["DROP INDEX {a}.changes_key_idx", "CREATE INDEX changes_row_idx ON {a}.changes USING hash (pk)"],
    ),
    "none": ("no index on the key (for scale)", ["DROP INDEX {a}.changes_key_idx"]),
}


def fill(conn: psycopg.Connection[Any]) -> None:
    """The floor's table, and one table per variant, each with an audit schema of its own."""
    conn.execute(SETUP.format(t="t_sfloor", n=TABLE_ROWS).encode())
    conn.execute(FLOOR_STATEMENT.encode())
    for name, (_, statements) in VARIANTS.items():
        table, audit = f"t_{name}", f"a_{name}"
        conn.execute(SETUP.format(t=table, n=TABLE_ROWS).encode())
        ddl.install(conn, audit_schema=audit)
        ddl.track(conn, table, audit_schema=audit)
        for statement in statements:
            conn.execute(statement.format(a=audit).encode())
        conn.execute(
            f"INSERT INTO {audit}.changes (transaction_id, table_schema, table_name, op, pk)"
            f" SELECT 0, 'public', '{table}', 'update', '{{\"id\": 1}}' FROM generate_series(1, {HOT})".encode()
        )
        for _ in range(GROW):
            conn.execute(
                f"BEGIN; SET LOCAL threadline.context = '{CONTEXT}'; UPDATE {table} SET d = d + 1; COMMIT".encode()
            )


def transaction(statement: str) -> str:
    return f"BEGIN; SET LOCAL threadline.context = '{CONTEXT}'; {statement}; COMMIT;\n"


def statements(table: str) -> dict[str, str]:
    return {
        "INSERT": f"INSERT INTO {table} SELECT g, g, 'x', 'y', g, now(), true, g"
        f" FROM generate_series(1000001, {1_000_000 + ROWS}) g",
        "UPDATE": f"UPDATE {table} SET a = a + 1, c = 'z' || a WHERE id <= {ROWS}",
        "DELETE": f"DELETE FROM {table} WHERE id > 1000000",
    }


def main() -> None:
    pg = valgrind_server()
    with scratch_root("threadline-key-index-") as root:
        pristine = pristine_cluster(pg, root, fill)
        data = root / "data"

        def count(text: str) -> int:
            return count_script(pg, pristine, data, text)

        base = count("SELECT 1;\n")
        bulk: dict[str, dict[str, int]] = {}
        single: dict[str, tuple[float, float]] = {}
        for table in ["t_sfloor"] + [f"t_{name}" for name in VARIANTS]:
            s = statements(table)
            inserted = count(transaction(s["INSERT"])) - base
            bulk[table] = {
                "INSERT": inserted,
                "UPDATE": count(transaction(s["UPDATE"])) - base,
                "DELETE": count(transaction(s["INSERT"]) + transaction(s["DELETE"])) - base - inserted,
            }
            if table != "t_sfloor":
                hot, cold = (
                    (count(transaction(f"UPDATE {table} SET a = a + 1 WHERE id = {key}") * SINGLE) - base)
                    / SINGLE
                    for key in (1, 77)
                )
                single[table] = (hot, cold)
        print(
            f"# The key index of changes (audit tables grown by {GROW} full-table updates of"
            f" {TABLE_ROWS:,} rows, one row with {HOT:,} earlier changes)\n"
        )
        print(f"| index | {ROWS:,}-row INSERT / UPDATE / DELETE, x floor | single-row UPDATE, row with"
              f" {HOT:,} changes | the same, a row with few |")  # fmt: skip
        print("|---|---|---:|---:|")
        floor = bulk["t_sfloor"]
        for name, (label, _) in VARIANTS.items():
            table = f"t_{name}"
            ratios = " / ".join(f"{bulk[table][op] / floor[op]:.2f}" for op in ("INSERT", "UPDATE", "DELETE"))
            hot, cold = single[table]
            print(f"| {label} | {ratios} | {hot:,.0f} | {cold:,.0f} |")
        print(
            "\nSingle-row figures are instructions per transaction (the UPDATE included); bulk figures"
            " are instructions of the statement's transaction over the floor trigger's."
        )


if __name__ == "__main__":
    main()
