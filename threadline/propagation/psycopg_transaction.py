"""The context on a transaction of any psycopg 3 connection, with psycopg's public API only.

``with threadline.transaction(conn):`` (``async with`` for an ``AsyncConnection``) opens a
transaction (a savepoint when nested) and sets the current context on it; :func:`apply_context`
sets a context on a transaction already open.
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import psycopg
from psycopg import pq

from threadline.core.context import AuditContext
from threadline.ddl.names import CONTEXT_SETTING
from threadline.propagation.psycopg_internals import ThreadlineConnection
from threadline.propagation.psycopg_setting import (
    SET_CONTEXT_SQL,
    context_payload,
    payload_for,
    set_local_command,
)

# Sets the context and returns the value it replaced (to restore after a nested block).
_SWAP_SQL = (
    "SELECT current_setting('" + CONTEXT_SETTING + "', true), set_config('" + CONTEXT_SETTING + "', %s, true)"
)
_INTRANS = pq.TransactionStatus.INTRANS
_ACTIVE = pq.TransactionStatus.ACTIVE


def _in_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True when a transaction is open on ``conn``; in pipeline mode the server reports ACTIVE
    until the next sync, while the statements queued meanwhile run in the open transaction."""
    status = conn.info.transaction_status
    return status == _INTRANS or (status == _ACTIVE and conn.pgconn.pipeline_status != pq.PipelineStatus.OFF)


def apply_context(conn: psycopg.Connection[Any], ctx: AuditContext | None = None) -> None:
    """Set ``ctx`` (default: the current context) on the transaction open on ``conn``.

    Must be called inside a transaction; in autocommit mode outside a transaction block the
    setting would end with its own statement, so that is refused.
    """
    if not _in_transaction(conn):
        raise psycopg.ProgrammingError(
            "apply_context() needs an open transaction: use threadline.transaction(conn)"
        )
    psycopg.Cursor(conn).execute(SET_CONTEXT_SQL, [payload_for(conn, context_payload(ctx))])


async def apply_context_async(conn: psycopg.AsyncConnection[Any], ctx: AuditContext | None = None) -> None:
    """Async twin of :func:`apply_context`."""
    if not _in_transaction(conn):
        raise psycopg.ProgrammingError(
            "apply_context_async() needs an open transaction: use threadline.transaction(conn)"
        )
    await psycopg.AsyncCursor(conn).execute(SET_CONTEXT_SQL, [payload_for(conn, context_payload(ctx))])


class transaction:  # noqa: N801 - used like psycopg's conn.transaction()
    """Open a transaction (a savepoint when nested) that carries the current audit context.

    ``with threadline.transaction(conn) as tx:`` for a :class:`psycopg.Connection`;
    ``async with threadline.transaction(aconn) as tx:`` for a :class:`psycopg.AsyncConnection`.
    Arguments and the yielded object are those of ``conn.transaction()``. On a plain connection
    the context costs one extra statement; on a :class:`ThreadlineConnection` it is applied by the
    connection itself.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        savepoint_name: str | None = None,
        force_rollback: bool = False,
    ) -> None:
        self._conn = conn
        self._args = (savepoint_name, force_rollback)
        self._sync: contextlib.AbstractContextManager[Any] | None = None
        self._async: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._outer_value: str | None = None

    def __enter__(self) -> psycopg.Transaction:
        conn = self._conn
        if not isinstance(conn, psycopg.Connection):
            raise TypeError("use `async with threadline.transaction(conn)` for an AsyncConnection")
        nested = _in_transaction(conn)
        self._sync = conn.transaction(*self._args)
        tx = self._sync.__enter__()
        payload = context_payload()
        # no context replaces none, nor the one an outer block applied
        if payload and not isinstance(conn, ThreadlineConnection):
            try:
                if nested:
                    row = psycopg.Cursor(conn).execute(_SWAP_SQL, [payload_for(conn, payload)]).fetchone()
                    self._outer_value = row[0] or "" if row is not None else ""
                else:
                    psycopg.Cursor(conn).execute(set_local_command(conn, payload))
            except BaseException as exc:
                self._sync.__exit__(type(exc), exc, exc.__traceback__)
                raise
        return tx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._sync is not None
        result = self._sync.__exit__(exc_type, exc, tb)
        conn = self._conn
        outer = self._outer_value
        if isinstance(conn, psycopg.Connection) and outer and _in_transaction(conn):
            # a released savepoint keeps its setting: give the outer transaction its own back (an
            # outer transaction without a context keeps the inner one: no context replaces one)
            psycopg.Cursor(conn).execute(set_local_command(conn, outer))
        return result

    async def __aenter__(self) -> psycopg.AsyncTransaction:
        conn = self._conn
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError("use `with threadline.transaction(conn)` for a synchronous Connection")
        nested = _in_transaction(conn)
        self._async = conn.transaction(*self._args)
        tx = await self._async.__aenter__()
        payload = context_payload()
        if not payload:  # no context replaces none, nor the one an outer block applied
            return tx
        try:
            if nested:
                cur = await psycopg.AsyncCursor(conn).execute(_SWAP_SQL, [payload_for(conn, payload)])
                row = await cur.fetchone()
                self._outer_value = row[0] or "" if row is not None else ""
            else:
                await psycopg.AsyncCursor(conn).execute(set_local_command(conn, payload))
        except BaseException as exc:
            await self._async.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._async is not None
        result = await self._async.__aexit__(exc_type, exc, tb)
        conn = self._conn
        outer = self._outer_value
        if isinstance(conn, psycopg.AsyncConnection) and outer and _in_transaction(conn):
            await psycopg.AsyncCursor(conn).execute(set_local_command(conn, outer))
        return result
