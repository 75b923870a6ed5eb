"""What a purge would remove, counted without removing it (``purge(dry_run=True)``)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

__all__ = ["purge_counts"]


def purge_counts(
    conn: psycopg.Connection[Any],
    audit: sql.Identifier,
    params: dict[str, Any],
    where_table: sql.Composable,
    where_c: sql.Composable,
    one_table: bool,
) -> tuple[int, int, int]:
    """The changes, transactions and task runs a purge before ``params["cutoff"]`` would remove:
    the changes (of the table ``where_table``/``where_c`` name, when ``one_table``), the
    transactions left with none (with ``one_table``, only those that held that table's changes),
    and, for a whole purge, the task runs that ended before."""
    with conn.transaction():
        changes = _count(
            conn,
            sql.SQL("SELECT count(*) FROM {a}.changes WHERE captured_at < %(cutoff)s{w}").format(
                a=audit, w=where_table
            ),
            params,
        )
        only = (
            sql.SQL(
                " AND EXISTS (SELECT 1 FROM {a}.changes c WHERE c.transaction_id = t.id"
                " AND c.captured_at < %(cutoff)s{wc})"
            ).format(a=audit, wc=where_c)
            if one_table
            else sql.SQL("")
        )
        transactions = _count(
            conn,
            sql.SQL(
                "SELECT count(*) FROM {a}.transactions t WHERE t.occurred_at < %(cutoff)s"
                " AND NOT EXISTS (SELECT 1 FROM {a}.changes c WHERE c.transaction_id = t.id"
                " AND NOT (c.captured_at < %(cutoff)s{wc})){only}"
            ).format(a=audit, wc=where_c, only=only),
            params,
        )
        runs = (
            0
            if one_table
            else _count(
                conn,
                sql.SQL("SELECT count(*) FROM {a}.task_runs WHERE ended_at < %(cutoff)s").format(a=audit),
                params,
            )
        )
    return changes, transactions, runs


def _count(conn: psycopg.Connection[Any], query: sql.Composed, params: dict[str, Any]) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0
