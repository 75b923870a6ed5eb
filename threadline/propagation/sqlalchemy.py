"""SQLAlchemy 2.x: every transaction begun on an engine threadline is installed on carries the audit
context.

::

    engine = create_engine("postgresql+psycopg://app@db/app")          # or create_async_engine
    threadline.propagation.sqlalchemy.install(engine)

    with threadline.context(actor=ActorRef.user("42")), Session(engine) as session:
        session.add(Post(title="x"))
        session.commit()                 # the transaction row records actor user:42

It works for Core and the ORM, sync and ``asyncio`` engines, with the ``psycopg`` (3) driver.

- Sync engines: each new driver connection becomes a
  :class:`~threadline.propagation.psycopg.ThreadlineConnection` in place
  (:func:`~threadline.propagation.psycopg.bridge`), so the connection itself applies the context:
  ``BEGIN`` and ``SET LOCAL`` in one message when a transaction begins, one ``SET LOCAL`` when the
  context changed mid-transaction, and per statement in ``AUTOCOMMIT`` mode. No SQLAlchemy event
  runs per statement. Connections pooled before :func:`install` are replaced: they are closed
  when next returned to the pool.
- Async engines: a ``before_cursor_execute`` listener looks at the driver connection before each
  statement. No transaction open yet (the statement would begin one) and a context current: it
  opens the transaction itself with ``BEGIN`` and ``SET LOCAL`` in one message, the round trip
  psycopg's own ``BEGIN`` would have cost. Inside a transaction whose context is not the current
  one: one ``SET LOCAL`` first. No context and none applied: nothing at all. Connections in
  ``AUTOCOMMIT`` isolation level are left alone: use a transaction (the default).

Either way a ``ROLLBACK TO SAVEPOINT`` (``begin_nested()`` rolled back) may undo a ``SET LOCAL``,
so the next statement sets the context again.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg import generators, pq
from sqlalchemy import event
from sqlalchemy.engine import Engine

from threadline.core.context import AuditContext, _current
from threadline.core.errors import ConfigurationError
from threadline.propagation.psycopg import (
    begin_command,
    bridge,
    context_payload,
    set_local_command,
)

try:  # SQLAlchemy >= 2.1
    from sqlalchemy.util import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

__all__ = ["install", "installed", "uninstall"]

_KEY: Final = "threadline.applied"
_UNKNOWN: Final = object()  # after ROLLBACK TO SAVEPOINT: the transaction's setting is not known
_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS


def _sync_engine(engine: Any) -> Engine:
    sync = getattr(engine, "sync_engine", engine)
    if not isinstance(sync, Engine):
        raise ConfigurationError(
            f"install() takes a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}"
        )
    return sync


def install(engine: Any) -> None:
    """Make every transaction begun on ``engine`` (``Engine`` or ``AsyncEngine``) carry the context.

    Idempotent. Raises :class:`~threadline.core.errors.ConfigurationError` unless the engine uses
    PostgreSQL through psycopg 3 (``postgresql+psycopg://``).
    """
    sync = _sync_engine(engine)
    dialect = sync.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise ConfigurationError(
            f"threadline's SQLAlchemy bridge needs PostgreSQL through psycopg 3, but the engine uses "
            f"{dialect.name}+{dialect.driver}: create it with a 'postgresql+psycopg://' URL"
        )
    if installed(sync):
        return
    if dialect.is_async:
        event.listen(sync, "before_cursor_execute", _before_async)
        event.listen(sync, "rollback_savepoint", _forget)
    else:
        event.listen(sync, "connect", _bridge_new_connection)
        sync.dispose(close=False)  # connections pooled before now are not bridged: replace them


def installed(engine: Any) -> bool:
    """True when :func:`install` was applied to ``engine``."""
    sync = _sync_engine(engine)
    return event.contains(sync, "connect", _bridge_new_connection) or event.contains(
        sync, "before_cursor_execute", _before_async
    )


def uninstall(engine: Any) -> None:
    """Undo :func:`install` (no-op when it was not applied)."""
    sync = _sync_engine(engine)
    if event.contains(sync, "before_cursor_execute", _before_async):
        event.remove(sync, "before_cursor_execute", _before_async)
    if event.contains(sync, "rollback_savepoint", _forget):
        event.remove(sync, "rollback_savepoint", _forget)
    if event.contains(sync, "connect", _bridge_new_connection):
        event.remove(sync, "connect", _bridge_new_connection)
        sync.dispose(close=False)  # bridged connections are closed when next returned


def _forget(conn: Any, name: str, context: Any) -> None:
    conn.connection.info[_KEY] = _UNKNOWN


def _bridge_new_connection(dbapi_connection: Any, connection_record: Any) -> None:
    bridge(dbapi_connection)


def _before_async(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    ctx = _current.get()
    fairy = conn.connection
    driver = fairy.driver_connection
    status = driver.pgconn.transaction_status
    if status == _IDLE:
        if ctx.is_empty or driver.autocommit:
            fairy.info[_KEY] = None
            return
        await_(_begin_async(driver, ctx))
        fairy.info[_KEY] = ctx
    elif status == _INTRANS:
        _apply_in_transaction(fairy, ctx)


def _apply_in_transaction(fairy: Any, ctx: AuditContext) -> None:
    info = fairy.info
    applied = info.get(_KEY)
    # an empty context (one that ended before the transaction did) leaves the applied one in place
    if applied is ctx or ctx.is_empty or (applied is not _UNKNOWN and applied == ctx):
        return
    # a cursor of its own: the statement's cursor may be a server-side (named) one, which can
    # only run the statement it was opened for
    cursor = fairy.cursor()
    try:
        cursor.execute(set_local_command(fairy.driver_connection, context_payload(ctx)))
    finally:
        cursor.close()
    info[_KEY] = ctx


async def _begin_async(conn: psycopg.AsyncConnection[Any], ctx: AuditContext) -> None:
    """Async twin of :func:`~threadline.propagation.psycopg.begin_with_context`."""
    pgconn = conn.pgconn
    async with conn.lock:
        pgconn.send_query(begin_command(conn, ctx))
        results = await conn.wait(generators.execute(pgconn))
        failed = [r for r in results if r.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)]
        if failed:
            message = (failed[0].error_message or b"").decode(errors="replace").strip()
            if pgconn.transaction_status != _IDLE:
                pgconn.send_query(b"ROLLBACK")
                await conn.wait(generators.execute(pgconn))
            raise psycopg.OperationalError(f"could not begin a transaction with the audit context: {message}")
