"""Whether a move to the partitioned layout is under way, and what marks one: the names of the
partitioned twins and of the old tables, the error a move raises, and the refusal other
operations give while it runs."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name

SUFFIX = "_partitioned"
"""The suffix of the partitioned twins (``transactions_partitioned``) while the move runs."""
OLD_SUFFIX = "_plain"
"""The suffix the old tables take when the twins replace them (``transactions_plain``)."""
TABLES = ("transactions", "changes")
"""The audit tables the move copies, in the order it copies them."""


class MigrationError(ConfigurationError):
    """The store cannot be moved (or was not moved completely); the message says why."""


def migration_in_progress(conn: psycopg.Connection[Any], audit_schema: str = DEFAULT_SCHEMA) -> bool:
    """Whether a move to the partitioned layout has started and not finished."""
    check_schema_name(audit_schema)
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        [audit_schema, "transactions" + SUFFIX],
    ).fetchone()
    return bool(row and row[0])


def refuse_during_migration(conn: psycopg.Connection[Any], audit_schema: str, what: str) -> None:
    """Raise :class:`MigrationError` when a move to the partitioned layout is under way."""
    if migration_in_progress(conn, audit_schema):
        raise MigrationError(
            f"{what} is refused while the audit store of schema {audit_schema!r} is being moved to the "
            "partitioned layout: finish the move first (`threadline partitions --migrate`)"
        )


def table_identifier(audit_schema: str, name: str) -> sql.Identifier:
    """The identifier of table ``name`` in the audit schema."""
    return sql.Identifier(audit_schema, name)
