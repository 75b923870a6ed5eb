"""Automatic mode: psycopg 3 connections and cursors that set the context on every transaction.

This module is the one place threadline relies on psycopg internals: :class:`ThreadlineConnection`
and its cursors override psycopg's private ``_start_query``, ``_prepare_statement`` and
``_execute_send``, which is what lets an implicit transaction carry its context in its own first
message, and :func:`bridge` switches an open connection's class. They are checked on psycopg 3.2.1
and 3.3.9 (``make test-matrix`` runs both), and the dependency range stops before 3.4.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import generators, pq, sql
from psycopg.abc import PQGen
from psycopg.rows import Row

from threadline.core.context import AuditContext, _current
from threadline.propagation.combined_classes import _combined
from threadline.propagation.psycopg_begin import _exec_begin
from threadline.propagation.psycopg_setting import (
    SET_CONTEXT_SQL,
    context_payload,
    payload_enricher,
    payload_for,
    set_local_command,
    setting_json,
)
from threadline.propagation.statement_kind import is_call, runs_outside_transaction, statement_text

_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS
_ACTIVE = pq.TransactionStatus.ACTIVE
_COMMAND_OK = pq.ExecStatus.COMMAND_OK


class ThreadlineCursor(psycopg.Cursor[Row]):
    """Cursor of a :class:`ThreadlineConnection`: applies the context before each statement."""

    _statement_prefix: bytes | None = None

    def _execute_send(self, query: Any, *, force_extended: bool = False, binary: bool | None = None) -> None:
        prefix = self._statement_prefix
        if prefix is None or force_extended or binary or self.format == pq.Format.BINARY:
            super()._execute_send(query, force_extended=force_extended, binary=binary)
            return
        # the client-side-bound statement, preceded by SET LOCAL in the same simple query;
        # the cursor keeps the statement alone as its query (what Django shows as the last query)
        self._query = query
        self._pgconn.send_query(prefix + query.query)

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> ThreadlineCursor[Row]:
        """Like :meth:`psycopg.Cursor.execute`, with the current context applied first."""
        conn = self._conn
        if isinstance(conn, ThreadlineConnection):
            if conn._needs_pipeline():
                return self._execute_autocommit(conn, query, params, kwargs)
            if conn._opens_transaction(self, kwargs):
                return self._execute_opening(conn, query, params)
            conn._prepare_statement()
        super().execute(query, params, **kwargs)
        return self

    def _execute_prefixed(
        self, conn: ThreadlineConnection[Any], prefix: list[bytes], query: Any, params: Any
    ) -> ThreadlineCursor[Row]:
        # A client-side-bound statement sent in one simple query after the commands in ``prefix``
        # (each with a result of its own, skipped so that the cursor is on the statement's).
        self._statement_prefix = b"".join(command + b"; " for command in prefix)
        try:
            super().execute(query, params)
        finally:
            self._statement_prefix = None
            if conn._begin_in_statement == threading.get_ident():
                conn._begin_in_statement = None
        for _ in prefix:
            self.nextset()
        return self

    def _execute_opening(
        self, conn: ThreadlineConnection[Any], query: Any, params: Any
    ) -> ThreadlineCursor[Row]:
        # The first statement of an implicit transaction, bound client-side: BEGIN, SET LOCAL and
        # the statement go as one simple query, where psycopg would have sent BEGIN alone first.
        ctx = _current.get()
        conn._begin_in_statement = threading.get_ident()
        self._execute_prefixed(conn, [conn._get_tx_start_command(), conn._set_local(ctx)], query, params)
        conn._applied = ctx
        return self

    def _execute_autocommit(
        self, conn: ThreadlineConnection[Any], query: Any, params: Any, kwargs: dict[str, Any]
    ) -> ThreadlineCursor[Row]:
        conn._applied = None  # no transaction is open: none carries a context yet
        if isinstance(query, sql.Composable):
            # rendered once here: psycopg takes the bytes as they are
            query = query.as_bytes(conn)
        text = statement_text(query, conn)
        if text is not None and runs_outside_transaction(text):
            # VACUUM, CREATE INDEX CONCURRENTLY and the like: alone, as without threadline
            super().execute(query, params, **kwargs)
            return self
        try:
            return self._execute_with_context(conn, query, params, kwargs)
        except psycopg.errors.InvalidTransactionTermination:
            if text is None or not is_call(text) or conn.pgconn.transaction_status != _IDLE:
                raise
            # The procedure commits, which it may not do in the implicit transaction block that
            # carried the context; that block rolled back whole. Called alone, its own
            # transactions carry no context.
            super().execute(query, params, **kwargs)
            return self

    def _execute_with_context(
        self, conn: ThreadlineConnection[Any], query: Any, params: Any, kwargs: dict[str, Any]
    ) -> ThreadlineCursor[Row]:
        if isinstance(self, psycopg.ClientCursor) and not any(kwargs.values()) and conn._pipeline is None:
            # Parameters are bound client-side anyway: the setting and the statement go as one
            # simple query, which the server runs as one implicit transaction.
            return self._execute_prefixed(conn, [conn._set_local(_current.get())], query, params)
        with conn.pipeline():
            psycopg.Cursor(conn).execute(SET_CONTEXT_SQL, [payload_for(conn, context_payload())])
            super().execute(query, params, **kwargs)
        return self

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        """Like :meth:`psycopg.Cursor.executemany`, with the current context applied first.

        In autocommit mode with a context active, the batch runs in one transaction.
        """
        conn = self.connection
        if isinstance(conn, ThreadlineConnection) and conn._needs_pipeline():
            with conn.transaction():
                conn._prepare_statement()
                super().executemany(query, params_seq, **kwargs)
            return
        if isinstance(conn, ThreadlineConnection):
            conn._prepare_statement()
        super().executemany(query, params_seq, **kwargs)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Row]:
        """Like :meth:`psycopg.Cursor.stream`, with the current context applied first.

        In autocommit mode with a context active, the statement runs in a transaction of its own,
        committed when the rows are read or the iteration is abandoned (as autocommit would)."""
        conn = self.connection
        if isinstance(conn, ThreadlineConnection):
            if conn._needs_pipeline():
                return self._stream_in_transaction(conn, super().stream(query, params, **kwargs))
            conn._prepare_statement()
        return super().stream(query, params, **kwargs)

    def _stream_in_transaction(self, conn: ThreadlineConnection[Any], rows: Iterator[Row]) -> Iterator[Row]:
        # psycopg's stream() sends its query at the first next(): the transaction opens here
        with conn.transaction():
            conn._prepare_statement()
            try:
                yield from rows
            except GeneratorExit:
                # psycopg cancels a query still running when its generator closes (the
                # transaction then rolls back); one that had finished commits
                rows.close()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[psycopg.Copy]:
        """Like :meth:`psycopg.Cursor.copy`, with the current context applied first.

        In autocommit mode with a context active, the copy runs in a transaction of its own."""
        conn = self.connection
        if isinstance(conn, ThreadlineConnection) and conn._needs_pipeline():
            with conn.transaction():
                conn._prepare_statement()
                with super().copy(statement, params, **kwargs) as copy:
                    yield copy
            return
        if isinstance(conn, ThreadlineConnection):
            conn._prepare_statement()
        with super().copy(statement, params, **kwargs) as copy:
            yield copy


class ThreadlineServerCursor(psycopg.ServerCursor[Row]):
    """Named (server-side) cursor of a :class:`ThreadlineConnection`: the ``DECLARE`` that runs
    the query is preceded by the context, like any other statement."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> ThreadlineServerCursor[Row]:
        """Like :meth:`psycopg.ServerCursor.execute`, with the current context applied first."""
        conn = self.connection
        if isinstance(conn, ThreadlineConnection):
            conn._prepare_statement()
        super().execute(query, params, **kwargs)
        return self


def threadline_server_cursor_class(
    factory: type[psycopg.ServerCursor[Any]],
) -> type[psycopg.ServerCursor[Any]]:
    """Like :func:`threadline_cursor_class`, for ``server_cursor_factory``."""
    return _combined(ThreadlineServerCursor, factory)


def threadline_cursor_class(factory: type[psycopg.Cursor[Any]]) -> type[psycopg.Cursor[Any]]:
    """``factory`` itself if it already applies the context, else a subclass of both it and
    :class:`ThreadlineCursor` (made once per class)."""
    if not issubclass(factory, psycopg.Cursor):
        raise TypeError(f"cursor_factory must be a psycopg.Cursor subclass, got {factory!r}")
    return _combined(ThreadlineCursor, factory)


class ThreadlineConnection(psycopg.Connection[Row]):
    """A psycopg connection whose every transaction carries the current audit context.

    - An implicit transaction (the first ``execute()`` outside a transaction) starts with one
      message holding ``BEGIN`` and ``SET LOCAL``: no extra round trip. A cursor that binds
      parameters client-side (``psycopg.ClientCursor``) adds the statement to that message.
    - Inside ``conn.transaction()`` (or when the context changed mid-transaction) the context is
      set by one ``SET LOCAL`` before the next statement, once per transaction.
    - In autocommit mode each statement runs in its own transaction with the context: a cursor
      that binds parameters client-side (``psycopg.ClientCursor``, Django's default) sends
      ``SET LOCAL`` and the statement as one simple query; other cursors pipeline ``set_config``
      with the statement. ``executemany``, ``stream()`` and ``copy()`` run in one transaction of
      their own. Statements that PostgreSQL refuses inside a transaction block (``VACUUM``,
      ``CREATE INDEX CONCURRENTLY``, ``CREATE DATABASE``, ...) are sent alone, as is a ``CALL``
      whose procedure commits (its writes then carry no context).
    - With no context active nothing is sent. Nothing outlives a transaction, so a connection
      returned to a pool never carries a previous request's context.
    - A cursor made directly (``psycopg.Cursor(conn)``, ``psycopg.ClientCursor(conn)``) instead
      of ``conn.cursor()`` carries the context too when it opens or first writes in a
      transaction; in autocommit mode it does not (its statements are recorded without actor):
      use ``conn.cursor()`` or ``conn.execute()`` there.

    Do not issue ``BEGIN``/``COMMIT``/``ROLLBACK TO`` as SQL text on it: use ``commit()``,
    ``rollback()`` and ``transaction()``, which the connection watches.
    """

    _set_local_cache: tuple[AuditContext, bytes]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = ThreadlineCursor
        self.server_cursor_factory = threadline_server_cursor_class(self.server_cursor_factory)
        self._applied: AuditContext | None = None

    # the thread whose cursor sends BEGIN in front of its statement (threads may share a connection)
    _begin_in_statement: int | None = None

    @property
    def cursor_factory(self) -> type[psycopg.Cursor[Any]]:
        """The cursor class; any class assigned is combined with :class:`ThreadlineCursor`.

        ``ThreadlineConnection.connect(dsn, cursor_factory=psycopg.ClientCursor)`` therefore
        still applies the context (a plain ``ClientCursor`` would silently skip it).
        """
        factory: type[psycopg.Cursor[Any]] | None = self.__dict__.get("_cursor_factory")
        if factory is None:
            # a connection whose class was switched to this one after it was made (the Django
            # bridge does that) still holds psycopg's own attribute
            factory = threadline_cursor_class(self.__dict__.get("cursor_factory", psycopg.Cursor))
            self._cursor_factory = factory
        return factory

    @cursor_factory.setter
    def cursor_factory(self, factory: type[psycopg.Cursor[Any]]) -> None:
        self._cursor_factory = threadline_cursor_class(factory)

    # -- transaction boundaries ------------------------------------------------------------
    def commit(self) -> None:
        """Commit, forgetting the context applied to the finished transaction."""
        self._applied = None
        super().commit()

    def rollback(self) -> None:
        """Roll back, forgetting the context applied to the finished transaction."""
        self._applied = None
        super().rollback()

    def tpc_begin(self, xid: psycopg.Xid | str) -> None:
        """Begin a two-phase transaction; the context is applied at its first statement."""
        self._applied = None  # psycopg's BEGIN opens it: whatever was applied ended before
        super().tpc_begin(xid)

    @contextlib.contextmanager
    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> Iterator[psycopg.Transaction]:
        """Like :meth:`psycopg.Connection.transaction`; the context is applied on first use."""
        outer = self.pgconn.transaction_status == _IDLE
        if outer:
            self._applied = None
        tx: psycopg.Transaction | None = None
        try:
            with super().transaction(savepoint_name, force_rollback) as tx:
                yield tx
        finally:
            # A rolled-back savepoint also undid any SET LOCAL made inside it.
            if outer or not _kept(tx):
                self._applied = None

    # -- applying the context ----------------------------------------------------------------
    def _needs_pipeline(self) -> bool:
        return self._autocommit and self.pgconn.transaction_status == _IDLE and not _current.get().is_empty

    def _opens_transaction(self, cursor: psycopg.Cursor[Any], kwargs: dict[str, Any]) -> bool:
        """True when ``cursor``'s next statement opens an implicit transaction with a context and
        can carry ``BEGIN`` and ``SET LOCAL`` in its own query (parameters bound client-side)."""
        return (
            not self._autocommit
            and self.pgconn.transaction_status == _IDLE
            and not any(kwargs.values())  # prepare=None, as Connection.execute() passes
            and self._pipeline is None
            and isinstance(cursor, psycopg.ClientCursor)
            and not _current.get().is_empty
        )

    def _start_query(self) -> PQGen[None]:
        # psycopg calls this before every statement of any cursor, to open the implicit
        # transaction. Threadline's cursors have opened it already (with the context); one made
        # directly (psycopg.Cursor(conn)) has not: its transaction opens here, with BEGIN and SET
        # LOCAL in one message (in a transaction() block, SET LOCAL alone; autocommit: nothing).
        if self._begin_in_statement == threading.get_ident():
            return
        ctx = _current.get()
        status = self.pgconn.transaction_status
        if ctx.is_empty or self._autocommit:
            yield from super()._start_query()
            return
        if self._pipeline is not None:
            # nothing may be sent synchronously: the setting is queued after psycopg's own BEGIN
            applied = None if status == _IDLE else self._applied
            yield from super()._start_query()
            if applied is not ctx and applied != ctx:
                self._applied = ctx
                yield from self._exec_command(self._set_local(ctx))
            return
        if status == _IDLE:
            command = self._get_tx_start_command() + b"; " + self._set_local(ctx)
        elif status == _INTRANS and self._applied is not ctx and self._applied != ctx:
            command = self._set_local(ctx)  # a transaction() block whose first statement this is
        else:
            return
        self.pgconn.send_query(command)
        results = yield from generators.execute(self.pgconn)
        for result in results:
            if result.status != _COMMAND_OK:
                raise psycopg.errors.error_from_result(result, encoding=self.pgconn._encoding)
        self._applied = ctx

    def _prepare_statement(self) -> None:
        """Make sure the transaction the next statement runs in carries the current context."""
        ctx = _current.get()
        status = self.pgconn.transaction_status
        if status == _IDLE:
            self._applied = None
            if ctx.is_empty or self._autocommit or self._pipeline is not None:
                return  # in pipeline mode _start_query() queues the setting after psycopg's BEGIN
            _exec_begin(self, self._get_tx_start_command() + b"; " + self._set_local(ctx))
            self._applied = ctx
        elif status == _INTRANS or (status == _ACTIVE and self._pipeline is not None):
            # (a pipeline is ACTIVE until its next sync, in a transaction: psycopg's, a transaction()
            # block's, in autocommit mode an implicit one). A context that ended before the
            # transaction did (an empty one now) leaves the one applied: only another replaces it.
            applied = self._applied
            if applied is ctx or ctx.is_empty or applied == ctx:
                return
            self._applied = ctx  # before: _start_query() must not send it a second time
            try:
                if status == _ACTIVE and self._autocommit and not self._num_transactions:
                    # SET LOCAL does not reach an implicit transaction: set_config() does
                    psycopg.Cursor(self).execute(SET_CONTEXT_SQL, [payload_for(self, context_payload(ctx))])
                else:
                    psycopg.Cursor(self).execute(self._set_local(ctx))
            except BaseException:
                self._applied = applied
                raise

    def _set_local(self, ctx: AuditContext) -> bytes:
        """``SET LOCAL`` of ``ctx``, quoted once per context object (once per transaction while a
        payload enricher is installed: its value may change under the same context)."""
        if payload_enricher() is not None:
            return set_local_command(self, context_payload(ctx))
        cached = self.__dict__.get("_set_local_cache")
        if cached is None or cached[0] is not ctx:
            # the plain value (never an enricher's): the cache outlives an enricher's uninstall
            cached = (ctx, set_local_command(self, "" if ctx.is_empty else setting_json(ctx)))
            self._set_local_cache = cached
        return cached[1]


def _kept(tx: psycopg.Transaction | None) -> bool:
    """True when the block ``tx`` was left without rolling back; no where psycopg (before 3.3, without
    ``Transaction.status``) does not tell: one more ``SET LOCAL`` then, never a missing one."""
    status = getattr(tx, "status", None)
    return status is not None and status.name in ("ACTIVE", "COMMITTED")
