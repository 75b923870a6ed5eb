"""Capture overhead benchmark: run with `make bench` (or `python bench/capture.py`).

Creates its own database (from $THREADLINE_DSN, default the loopback PostgreSQL), measures, prints
a Markdown report and drops the database. Every figure is a ratio against a baseline measured in
the same run, as the median of interleaved rounds.

- single-row INSERT / UPDATE transactions and a 10-UPDATE transaction, with pgbench (1 client):
  TPS of a table with no trigger, with a bare "floor" row trigger (inserts to_jsonb(NEW) into an
  unindexed table), with a row-level "upsert" reference trigger (per row: upsert the transaction
  row by txid, then insert the change with its images; the per-row design that threadline's
  statement-level capture replaces) and with threadline capture (its indexes in place), both as
  typed code (what a database with the DDL event triggers runs) and as drift-safe code (what a
  database without them runs).
- one statement inserting / updating / deleting 10,000 rows: time with no trigger, with a
  statement-level floor trigger (transition tables, one INSERT ... SELECT of images) and with
  threadline.
- automatic context mode: a single-row transaction on a ThreadlineConnection with a context
  active vs none.
- audit storage per change.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import threadline  # noqa: E402
from bench._db import pgbench_tps as run_pgbench  # noqa: E402
from threadline import ActorRef, ThreadlineConnection, ddl  # noqa: E402
from threadline.propagation.psycopg import set_local_command  # noqa: E402

ADMIN_DSN = os.environ.get("THREADLINE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
BULK_ROWS = 10_000
TABLE_ROWS = 100_000

SETUP = """
CREATE TABLE {t} (id bigint PRIMARY KEY, a int, b text, c text, d int, e timestamptz, f bool, g numeric);
INSERT INTO {t} SELECT g, g, 'x' || g, 'y', g, now(), true, g FROM generate_series(1, {n}) g;
"""
FLOOR_ROW = """
CREATE TABLE floor_log (j jsonb);
CREATE FUNCTION floor_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO floor_log VALUES (to_jsonb(NEW)); RETURN NULL; END $$;
CREATE TRIGGER floor_row AFTER INSERT OR UPDATE ON t_floor FOR EACH ROW EXECUTE FUNCTION floor_row();
"""
FLOOR_STATEMENT = """
CREATE TABLE sfloor_log (op text, before jsonb, after jsonb);
CREATE FUNCTION sfloor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    INSERT INTO sfloor_log SELECT 'update', to_jsonb(o.r), to_jsonb(n.r)
      FROM (SELECT row_number() OVER () AS rn, t AS r FROM old_rows t) o
      JOIN (SELECT row_number() OVER () AS rn, t AS r FROM new_rows t) n USING (rn);
  ELSIF TG_OP = 'INSERT' THEN
    INSERT INTO sfloor_log SELECT 'insert', NULL, to_jsonb(n) FROM new_rows n;
  ELSE
    INSERT INTO sfloor_log SELECT 'delete', to_jsonb(o), NULL FROM old_rows o;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER sf_i AFTER INSERT ON t_sfloor REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION sfloor();
CREATE TRIGGER sf_u AFTER UPDATE ON t_sfloor REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION sfloor();
CREATE TRIGGER sf_d AFTER DELETE ON t_sfloor REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION sfloor();
"""
# Per row: upsert the transaction row by txid (reading the context unvalidated), then insert the
# change with the new image and the changed columns. Indexed for the same lookups as threadline.
UPSERT_REFERENCE = """
CREATE TABLE ref_tx (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, txid bigint NOT NULL UNIQUE,
  actor jsonb, correlation_id text, occurred_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON ref_tx (correlation_id);
CREATE TABLE ref_changes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, transaction_id bigint NOT NULL,
  table_name text NOT NULL, op text NOT NULL, pk text, data jsonb, changed jsonb,
  captured_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON ref_changes (transaction_id);
CREATE INDEX ON ref_changes (table_name, pk);
CREATE FUNCTION ref_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ctx jsonb := nullif(current_setting('threadline.context', true), '')::jsonb;
  tx bigint;
BEGIN
  INSERT INTO ref_tx (txid, actor, correlation_id)
  VALUES (txid_current(), ctx -> 'actor', ctx ->> 'correlation_id')
  ON CONFLICT (txid) DO UPDATE SET actor = EXCLUDED.actor
  RETURNING id INTO tx;
  IF TG_OP = 'UPDATE' THEN
    INSERT INTO ref_changes (transaction_id, table_name, op, pk, data, changed)
    SELECT tx, TG_TABLE_NAME, 'update', NEW.id::text, to_jsonb(NEW), jsonb_object_agg(n.key, n.value)
      FROM jsonb_each(to_jsonb(NEW)) n JOIN jsonb_each(to_jsonb(OLD)) o USING (key)
     WHERE n.value IS DISTINCT FROM o.value;
  ELSIF TG_OP = 'INSERT' THEN
    INSERT INTO ref_changes (transaction_id, table_name, op, pk, data)
    VALUES (tx, TG_TABLE_NAME, 'insert', NEW.id::text, to_jsonb(NEW));
  ELSE
    INSERT INTO ref_changes (transaction_id, table_name, op, pk, data)
    VALUES (tx, TG_TABLE_NAME, 'delete', OLD.id::text, to_jsonb(OLD));
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER ref_capture AFTER INSERT OR UPDATE OR DELETE ON t_ref FOR EACH ROW EXECUTE FUNCTION ref_capture();
"""
CONTEXT = '{"actor":{"id":"42","type":"user"},"correlation_id":"bench","v":1}'
PGBENCH = {
    "single-row INSERT": (
        "\\set id random(1000000000, 9000000000)\n"
        "BEGIN;\nSET LOCAL threadline.context = '" + CONTEXT + "';\n"
        "INSERT INTO {t} VALUES (:id, 1, 'x', 'y', 1, now(), true, 1) ON CONFLICT DO NOTHING;\nEND;\n"
    ),
    "single-row UPDATE": (
        "\\set id random(1, " + str(TABLE_ROWS) + ")\n"
        "BEGIN;\nSET LOCAL threadline.context = '" + CONTEXT + "';\n"
        "UPDATE {t} SET a = a + 1 WHERE id = :id;\nEND;\n"
    ),
    "10-UPDATE transaction": (
        "\\set id random(1, " + str(TABLE_ROWS - 10) + ")\n"
        "BEGIN;\nSET LOCAL threadline.context = '"
        + CONTEXT
        + "';\n"
        + "".join(f"UPDATE {{t}} SET a = a + 1 WHERE id = :id + {i};\n" for i in range(10))
        + "END;\n"
    ),
}


def track_drift_safe(conn: psycopg.Connection, table: str, mask: list[str] | None = None) -> None:
    """Track ``table`` with drift-safe capture code, as a database without event triggers has."""
    ddl.track(conn, table, mask=mask)
    conn.execute(
        "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = %s",
        [table],
    )


def pgbench_tps(dsn: str, script: str) -> float:
    """TPS of ``script`` (pgbench, one client, SECONDS)."""
    return run_pgbench(dsn, script, SECONDS)


def bulk_ms(conn: psycopg.Connection, table: str, op: str) -> float:
    statements = {
        "INSERT": f"INSERT INTO {table} SELECT g, g, 'x', 'y', g, now(), true, g "
        f"FROM generate_series(1000001, {1000000 + BULK_ROWS}) g",
        "UPDATE": f"UPDATE {table} SET a = a + 1, c = 'z' || a WHERE id <= {BULK_ROWS}",
        "DELETE": f"DELETE FROM {table} WHERE id > 1000000",
    }
    start = time.perf_counter()
    with conn.transaction():
        conn.execute(set_local_command(conn, CONTEXT))
        conn.execute(statements[op])
    return (time.perf_counter() - start) * 1000


def bulk_medians(conn: psycopg.Connection, tables: tuple[str, ...], op: str, rounds: int) -> dict[str, float]:
    """Median ms of one 10,000-row ``op`` statement on each table, in interleaved rounds (the rows
    a DELETE removes are inserted first; the rows an INSERT adds are deleted after)."""
    times: dict[str, list[float]] = {t: [] for t in tables}
    for _ in range(rounds):
        for table in tables:
            if op == "DELETE":
                bulk_ms(conn, table, "INSERT")
            times[table].append(bulk_ms(conn, table, op))
            if op == "INSERT":
                bulk_ms(conn, table, "DELETE")
    return {t: statistics.median(v) for t, v in times.items()}


def auto_context_us(dsn: str, with_context: bool, n: int = 1500) -> float:
    with ThreadlineConnection.connect(dsn) as conn:
        ctx = threadline.context(actor=ActorRef.user("42"), correlation_id="bench") if with_context else None
        if ctx:
            ctx.__enter__()
        try:
            start = time.perf_counter()
            for i in range(n):
                conn.execute("UPDATE t_tl SET a = a + 1 WHERE id = %s", [i % TABLE_ROWS + 1])
                conn.commit()
            return (time.perf_counter() - start) / n * 1e6
        finally:
            if ctx:
                ctx.__exit__(None, None, None)


def main() -> None:
    name = f"threadline_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)
    try:
        run(dsn)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        for t in ("t_plain", "t_floor", "t_sfloor", "t_ref", "t_tl", "t_tld"):
            conn.execute(SETUP.format(t=t, n=TABLE_ROWS).encode())
        conn.execute(FLOOR_ROW.encode())
        conn.execute(FLOOR_STATEMENT.encode())
        conn.execute(UPSERT_REFERENCE.encode())
        ddl.install(conn)
        ddl.track(conn, "t_tl")
        track_drift_safe(conn, "t_tld")
        conn.execute("VACUUM ANALYZE")

    print(
        f"# threadline capture benchmark\n\nPostgreSQL {version}, {os.cpu_count()} cores, "
        f"{ROUNDS} interleaved rounds, medians.\n"
    )

    print(f"## Single-row transactions (pgbench, 1 client, {SECONDS} s per run)\n")
    print(
        "| workload | no trigger TPS | floor row trigger | row-level upsert reference | threadline "
        "| threadline, drift-safe |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, template in PGBENCH.items():
        tps: dict[str, list[float]] = {"t_plain": [], "t_floor": [], "t_ref": [], "t_tl": [], "t_tld": []}
        for _ in range(ROUNDS):
            for table in tps:
                tps[table].append(pgbench_tps(dsn, template.replace("{t}", table)))
        base = statistics.median(tps["t_plain"])
        print(
            f"| {label} | {base:.0f} | {statistics.median(tps['t_floor']) / base:.2f}x | "
            f"{statistics.median(tps['t_ref']) / base:.2f}x | {statistics.median(tps['t_tl']) / base:.2f}x | "
            f"{statistics.median(tps['t_tld']) / base:.2f}x |"
        )
        sys.stdout.flush()

    print(f"\n## One statement changing {BULK_ROWS:,} rows (ms)\n")
    print(
        "| statement | no trigger | statement floor | row-level upsert reference | threadline | threadline / floor "
        "| drift-safe | drift-safe / floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for op in ("INSERT", "UPDATE", "DELETE"):
            med = bulk_medians(conn, ("t_plain", "t_sfloor", "t_ref", "t_tl", "t_tld"), op, ROUNDS + 2)
            print(
                f"| {op} | {med['t_plain']:.0f} | {med['t_sfloor']:.0f} | {med['t_ref']:.0f} | {med['t_tl']:.0f} | "
                f"{med['t_tl'] / med['t_sfloor']:.2f}x | {med['t_tld']:.0f} | {med['t_tld'] / med['t_sfloor']:.2f}x |"
            )
            sys.stdout.flush()

    print("\n## Automatic context mode (ThreadlineConnection, implicit single-row transactions)\n")
    without, with_ctx = [], []
    for _ in range(ROUNDS + 2):
        without.append(auto_context_us(dsn, False))
        with_ctx.append(auto_context_us(dsn, True))
    a, b = statistics.median(without), statistics.median(with_ctx)
    print("| no context | context active | overhead |\n|---:|---:|---:|")
    print(f"| {a:.0f} µs | {b:.0f} µs | {100 * (b / a - 1):+.1f}% |")

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE threadline.changes, threadline.transactions")
        # a partitioned table's own size is 0: sum its partitions (a plain table is its own tree)
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM threadline.changes),
                   (SELECT sum(pg_table_size(p.relid)) FROM pg_partition_tree('threadline.changes') p),
                   (SELECT sum(pg_indexes_size(p.relid)) FROM pg_partition_tree('threadline.changes') p),
                   (SELECT avg(pg_column_size(c.*)) FROM threadline.changes c WHERE op = 'update'),
                   (SELECT count(*) FROM threadline.transactions),
                   (SELECT sum(pg_total_relation_size(p.relid)) FROM pg_partition_tree('threadline.transactions') p)
            """
        ).fetchone()
    assert row is not None
    n, heap, idx, upd_row, ntx, txsize = row
    print("\n## Audit storage\n")
    print(
        "| changes | heap bytes/change | index bytes/change | avg update row | transactions | bytes/transaction |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {n:,} | {heap / n:.0f} | {idx / n:.0f} | {float(upd_row):.0f} | {ntx:,} | {txsize / max(ntx, 1):.0f} |"
    )


if __name__ == "__main__":
    main()
