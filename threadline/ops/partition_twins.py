"""Create the partitioned twins of the audit tables: their keys, the old tables' indexes, a
partition for every period the data covers and those ahead, and a DEFAULT partition."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from psycopg import sql

from threadline.ops.partition_migration_state import (
    SUFFIX,
    TABLES,
    MigrationError,
    migration_in_progress,
    table_identifier,
)

logger = logging.getLogger("threadline.partitions")


def create_twins(conn: psycopg.Connection[Any], audit_schema: str, period: str, ahead: int) -> None:
    """Create the partitioned twins, their indexes and partitions (once; a rerun finds them)."""
    a = sql.Identifier(audit_schema)
    if migration_in_progress(conn, audit_schema):
        return
    with conn.transaction():
        # erasures and purges check for the twins under this lock: none is half done now
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"threadline seal {audit_schema}"])
        for table in TABLES:
            new = table_identifier(audit_schema, table + SUFFIX)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {new} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING COMMENTS{extra})"
                    " PARTITION BY RANGE (occurred_at)"
                ).format(
                    new=new,
                    old=table_identifier(audit_schema, table),
                    extra=sql.SQL(
                        ", occurred_at timestamptz NOT NULL DEFAULT now()" if table == "changes" else ""
                    ),
                )
            )
            key = "transaction_id, id, occurred_at" if table == "changes" else "id, occurred_at"
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
                    new, sql.Identifier(table + SUFFIX + "_pkey"), sql.SQL(key)
                )
            )
            # the old table's other indexes, under temporary names
            for name, definition in conn.execute(
                "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass AND NOT i.indisprimary ORDER BY c.relname",
                [f'"{audit_schema}"."{table}"'],
            ).fetchall():
                target = table_identifier(audit_schema, table + SUFFIX).as_string(conn)
                rebuilt = re.sub(
                    r" ON (ONLY )?\S+ USING ", f" ON {target} USING ", definition, count=1
                ).replace(f"INDEX {name} ON", f"INDEX {name}{SUFFIX} ON", 1)
                if f"{name}{SUFFIX} ON {target} USING" not in rebuilt:
                    raise MigrationError(f"cannot rebuild index {name} of {table}: {definition}")
                conn.execute(rebuilt.encode())
        first = conn.execute(
            sql.SQL("SELECT least(min(occurred_at), now()) FROM {a}.transactions").format(a=a)
        ).fetchone()
        assert first is not None
        slots = conn.execute(
            sql.SQL(
                "WITH RECURSIVE s(lo, hi, n) AS ("
                "  SELECT (x).lo, (x).hi, 0 FROM (SELECT {a}.partition_slot(%(p)s, %(first)s) AS x) f"
                "  UNION ALL SELECT (y).lo, (y).hi, s.n + (CASE WHEN s.lo > now() THEN 1 ELSE 0 END)"
                "    FROM s, LATERAL (SELECT {a}.partition_slot(%(p)s, s.hi) AS y) z WHERE s.n < %(ahead)s)"
                " SELECT lo, hi FROM s ORDER BY lo"
            ).format(a=a),
            {"p": period, "first": first[0], "ahead": ahead},
        ).fetchall()
        for table in TABLES:
            parent = table_identifier(audit_schema, table + SUFFIX)
            for lo, hi in slots:
                named = conn.execute(
                    sql.SQL("SELECT {}.partition_name(%s, %s, %s)").format(a), [table, period, lo]
                ).fetchone()
                assert named is not None
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        table_identifier(audit_schema, named[0]),
                        parent,
                        sql.Literal(lo),
                        sql.Literal(hi),
                    )
                )
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
                    table_identifier(audit_schema, f"{table}_default"), parent
                )
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {a}.partitioning (period, ahead) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            ).format(a=a),
            [period, ahead],
        )
    logger.info("partitioned tables prepared: %d periods", len(slots))
