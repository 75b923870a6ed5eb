"""The context → PostgreSQL bridge for psycopg 3.

Every transaction that should carry the current :class:`~threadline.core.context.AuditContext` sets
``threadline.context`` to its canonical JSON with ``SET LOCAL`` (``set_config(..., true)`` where a
statement runs outside a transaction block): a transaction-local setting
that the capture trigger reads once, that vanishes at commit or rollback, and that is therefore
safe behind PgBouncer's transaction pooling.

Two ways to use it:

- ``with threadline.transaction(conn): ...`` (or ``async with`` for an ``AsyncConnection``)
  opens a transaction (a savepoint when nested) and applies the current context to it.
- Automatic mode: connect with :class:`ThreadlineConnection` (``ThreadlineConnection.connect(dsn)``
  or ``ConnectionPool(dsn, connection_class=ThreadlineConnection)``). Every transaction begun while
  a context is active carries it, whether it was opened implicitly by ``execute()`` or with
  ``conn.transaction()``. An implicit transaction's ``BEGIN`` and ``SET LOCAL`` travel in one
  message, so it costs no extra network round trip. :func:`bridge` turns a connection someone
  else opened (an ORM's) into one in place.

Automatic mode is the one place threadline relies on psycopg internals, all of them in
:mod:`threadline.propagation.psycopg_internals`; ``threadline.transaction(conn)``
(:mod:`threadline.propagation.psycopg_transaction`) uses public API only.
"""

from __future__ import annotations

from threadline.propagation.psycopg_begin import begin_command, begin_with_context
from threadline.propagation.psycopg_bridge import SavepointAwareCursor, bridge
from threadline.propagation.psycopg_internals import (
    ThreadlineConnection,
    ThreadlineCursor,
    ThreadlineServerCursor,
    threadline_cursor_class,
    threadline_server_cursor_class,
)
from threadline.propagation.psycopg_setting import (
    SET_CONTEXT_SQL,
    PayloadEnricher,
    context_payload,
    payload_enricher,
    set_local_command,
    set_payload_enricher,
    setting_json,
)
from threadline.propagation.psycopg_transaction import apply_context, apply_context_async, transaction

__all__ = [
    "SET_CONTEXT_SQL",
    "PayloadEnricher",
    "SavepointAwareCursor",
    "ThreadlineConnection",
    "ThreadlineCursor",
    "ThreadlineServerCursor",
    "apply_context",
    "apply_context_async",
    "begin_command",
    "begin_with_context",
    "bridge",
    "context_payload",
    "payload_enricher",
    "set_local_command",
    "set_payload_enricher",
    "setting_json",
    "threadline_cursor_class",
    "threadline_server_cursor_class",
    "transaction",
]
