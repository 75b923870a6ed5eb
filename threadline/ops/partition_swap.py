"""The end of a move to the partitioned layout: under the tables' locks, copy the last rows and
put the twins in the old tables' place; then check that every old row was copied and drop the
old tables."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors, sql

from threadline.ddl.schema import layout_sql
from threadline.ops.partition_copy import copy_positions, last_transaction_id
from threadline.ops.partition_migration_state import (
    OLD_SUFFIX,
    SUFFIX,
    TABLES,
    MigrationError,
    table_identifier,
)


def swap_tables(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    statements: dict[str, sql.Composed],
    lock_timeout: float,
) -> tuple[int, int]:
    """Copy the rest under the tables' locks and swap the names; returns rows copied."""
    a = sql.Identifier(audit_schema)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"])
        # changes first, as a writer takes them: its capture INSERT into changes opens the
        # transaction's row from inside the statement (a deadlock left is retried by the caller)
        conn.execute(sql.SQL("LOCK TABLE {a}.changes, {a}.transactions IN ACCESS EXCLUSIVE MODE").format(a=a))
        conn.execute("SELECT set_config('lock_timeout', '0', true)")
        upto = last_transaction_id(conn, audit_schema)
        copied = [0, 0]
        done_tx, (after_tx, after) = copy_positions(conn, audit_schema)
        for i, kind in enumerate(TABLES):
            row = conn.execute(
                statements[kind],
                {
                    "after": done_tx if kind == "transactions" else after,
                    "after_tx": after_tx,
                    "upto": upto,
                    "n": 2**62,
                },
            ).fetchone()
            copied[i] = int(row[0]) if row else 0
        for table in TABLES:
            old, new = table + OLD_SUFFIX, table + SUFFIX
            seq = conn.execute(
                "SELECT pg_get_serial_sequence(%s, 'id')", [f'"{audit_schema}"."{table}"']
            ).fetchone()
            last = conn.execute(f"SELECT last_value FROM {seq[0]}").fetchone() if seq and seq[0] else None
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN id RESTART WITH {}").format(
                    table_identifier(audit_schema, new), sql.Literal(int(last[0]) + 1 if last else 1)
                )
            )
            # the old table, its key and its indexes step aside under the _plain suffix
            conn.execute(
                sql.SQL("ALTER TABLE {}.{} RENAME TO {}").format(
                    a, sql.Identifier(table), sql.Identifier(old)
                )
            )
            for (index,) in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass",
                [f'"{audit_schema}"."{old}"'],
            ).fetchall():
                conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        table_identifier(audit_schema, index), sql.Identifier(index + OLD_SUFFIX)
                    )
                )
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    table_identifier(audit_schema, new), sql.Identifier(table)
                )
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                    table_identifier(audit_schema, table),
                    sql.Identifier(new + "_pkey"),
                    sql.Identifier(table + "_pkey"),
                )
            )
            for (index,) in conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = %s::regclass",
                [f'"{audit_schema}"."{table}"'],
            ).fetchall():
                if index.endswith(SUFFIX):
                    conn.execute(
                        sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                            table_identifier(audit_schema, index), sql.Identifier(index[: -len(SUFFIX)])
                        )
                    )
            # the new table's privileges are the old one's
            for grantee, privilege in conn.execute(
                "SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type FROM pg_class c,"
                " aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee"
                " WHERE c.oid = %s::regclass AND a.grantee <> c.relowner",
                [f'"{audit_schema}"."{old}"'],
            ).fetchall():
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(privilege),
                        table_identifier(audit_schema, table),
                        sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee),
                    )
                )
            conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(table_identifier(audit_schema, old)))
        # the schema's functions and triggers that depend on the layout, rebuilt for partitions
        # (the rest of the install script would lock the tracked tables: not while holding these)
        conn.execute(layout_sql(audit_schema).encode())
    return copied[0], copied[1]


def check_and_drop_old(conn: psycopg.Connection[Any], audit_schema: str, keep_old: bool) -> None:
    """Check that every old row has its copy (by count, up to the last old id), then drop the old tables."""
    a = sql.Identifier(audit_schema)
    for table in TABLES:
        old = table_identifier(audit_schema, table + OLD_SUFFIX)
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {old}),"
                " (SELECT count(*) FROM {a}.{t} WHERE id <= (SELECT coalesce(max(id), 0) FROM {old}))"
            ).format(old=old, a=a, t=sql.Identifier(table))
        ).fetchone()
        assert row is not None
        if row[0] > row[1]:
            raise MigrationError(
                f"{table}: {row[0]} rows in the old table but {row[1]} copied; the old table is kept as "
                f"{audit_schema}.{table}{OLD_SUFFIX} and nothing was dropped"
            )
    if keep_old:
        return
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {a}.transaction_digest({old})").format(
                    a=a, old=table_identifier(audit_schema, "transactions" + OLD_SUFFIX)
                )
            )
            conn.execute(
                sql.SQL("DROP TABLE {}, {}").format(
                    table_identifier(audit_schema, "changes" + OLD_SUFFIX),
                    table_identifier(audit_schema, "transactions" + OLD_SUFFIX),
                )
            )
    except errors.DependentObjectsStillExist as exc:
        raise MigrationError(
            f"the store is partitioned and every row was copied, but the old tables {audit_schema}.changes"
            f"{OLD_SUFFIX} and {audit_schema}.transactions{OLD_SUFFIX} were kept: {exc.diag.message_detail or exc}."
            " Move what depends on them to the new tables, then drop them (DROP TABLE ...)"
        ) from exc


def old_tables_left(conn: psycopg.Connection[Any], audit_schema: str) -> bool:
    """Whether the old tables are still there, under their ``_plain`` names."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        [audit_schema, "transactions" + OLD_SUFFIX],
    ).fetchone()
    return bool(row and row[0])
