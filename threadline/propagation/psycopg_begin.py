"""Opening a psycopg 3 transaction that carries a context: ``BEGIN`` and ``SET LOCAL`` in one message.

For integrations that open transactions themselves (ORM bridges) and for
:class:`~threadline.propagation.psycopg_internals.ThreadlineConnection`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq

from threadline.core.context import AuditContext
from threadline.propagation.psycopg_setting import payload_enricher, set_local_command, setting_json

_IDLE = pq.TransactionStatus.IDLE
_COMMAND_OK = pq.ExecStatus.COMMAND_OK


def _begin_statement_sql(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    parts = ["BEGIN"]
    if conn.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + conn.isolation_level.name.replace("_", " "))
    if conn.read_only is not None:
        parts.append("READ ONLY" if conn.read_only else "READ WRITE")
    if conn.deferrable is not None:
        parts.append("DEFERRABLE" if conn.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def begin_command(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], ctx: AuditContext) -> bytes:
    """The one simple-protocol message that opens a transaction on ``conn`` carrying ``ctx``.

    ``BEGIN`` (with the connection's isolation level, read-only and deferrable settings) followed
    by ``SET LOCAL``; the value is quoted by psycopg's own literal adapter for ``conn``'s encoding.
    For integrations that open transactions themselves (ORM bridges); see :func:`begin_with_context`.
    """
    enrich = payload_enricher()
    payload = setting_json(ctx) if enrich is None or ctx.is_empty else enrich(ctx)
    return _begin_statement_sql(conn).encode() + b"; " + set_local_command(conn, payload)


def begin_with_context(conn: psycopg.Connection[Any], ctx: AuditContext) -> None:
    """Open a transaction on idle, non-autocommit ``conn`` that carries ``ctx``, in one round trip.

    psycopg then sees the transaction already open and sends no ``BEGIN`` of its own, so the
    context costs no extra network round trip. Raises :class:`psycopg.OperationalError` (with the
    connection left idle) when the server refuses the command.
    """
    _exec_begin(conn, begin_command(conn, ctx))


def _exec_begin(conn: psycopg.Connection[Any], command: bytes) -> None:
    with conn.lock:  # the connection may be shared by threads, like any psycopg connection
        result = conn.pgconn.exec_(command)
        if result.status == _COMMAND_OK:
            return
        message = (result.error_message or b"").decode(errors="replace").strip()
        if conn.pgconn.transaction_status != _IDLE:
            conn.pgconn.exec_(b"ROLLBACK")
    raise psycopg.OperationalError(f"could not begin a transaction with the audit context: {message}")
