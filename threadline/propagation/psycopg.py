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

Automatic mode is the one place threadline relies on psycopg internals: :class:`ThreadlineConnection`
and its cursors override psycopg's private ``_start_query``, ``_prepare_statement`` and
``_execute_send``, which is what lets an implicit transaction carry its context in its own first
message. They are checked on psycopg 3.2.1 and 3.3.9 (``make test-matrix`` runs both), and the
dependency range stops before 3.4. ``threadline.transaction(conn)`` uses public API only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import psycopg
from psycopg import generators, pq, sql
from psycopg.abc import PQGen
from psycopg.rows import Row

from threadline.core.context import AuditContext, _current, current
from threadline.core.errors import ConfigurationError
from threadline.ddl.names import CONTEXT_SETTING

SET_CONTEXT_SQL = "SELECT set_config('" + CONTEXT_SETTING + "', %s, true)"
# Sets the context and returns the value it replaced (to restore after a nested block).
_SWAP_SQL = (
    "SELECT current_setting('" + CONTEXT_SETTING + "', true), set_config('" + CONTEXT_SETTING + "', %s, true)"
)
_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS
_COMMAND_OK = pq.ExecStatus.COMMAND_OK


def set_local_command(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], payload: str) -> bytes:
    """``SET LOCAL threadline.context = <payload>``, quoted for ``conn``'s encoding.

    Inside a transaction block this is the cheapest way to set the context: a utility command the
    server neither plans nor executes as a query (``SELECT set_config(...)`` sent as text cost a
    quarter of a small transaction's throughput in measurements). Outside a block (autocommit
    statements, pipelines) it would have no effect: use ``SET_CONTEXT_SQL`` there.
    """
    return b"SET LOCAL " + CONTEXT_SETTING.encode() + b" = " + sql.Literal(payload).as_bytes(conn)


PayloadEnricher = Callable[[AuditContext], str]
"""``enricher(ctx) -> str``: the setting's value for a non-empty ``ctx`` (see
:func:`set_payload_enricher`)."""

# None (the default): a context's setting is its canonical JSON. Read once per payload computed.
_payload_enricher: PayloadEnricher | None = None


def set_payload_enricher(enricher: PayloadEnricher | None) -> PayloadEnricher | None:
    """Make ``enricher`` compute the database setting of every non-empty context from now on
    (``None``: back to ``ctx.to_json()``); returns the one it replaces.

    The hook of integrations that add transaction-level data the context itself does not carry
    (:mod:`threadline.otel` adds the active span's ids to ``meta``). It is called each time a
    transaction's value is computed, in the thread or task that opens the transaction, never for
    an empty context; it must return valid canonical context JSON and must not raise. Only the
    database setting is affected: Celery headers and the current context are not.
    """
    global _payload_enricher
    previous, _payload_enricher = _payload_enricher, enricher
    return previous


def payload_enricher() -> PayloadEnricher | None:
    """The function :func:`set_payload_enricher` installed, or ``None``."""
    return _payload_enricher


def context_payload(ctx: AuditContext | None = None) -> str:
    """The setting's value for ``ctx`` (default: the current context); ``""`` when empty."""
    ctx = current() if ctx is None else ctx
    if ctx.is_empty:
        return ""
    enrich = _payload_enricher
    return ctx.to_json() if enrich is None else enrich(ctx)


def apply_context(conn: psycopg.Connection[Any], ctx: AuditContext | None = None) -> None:
    """Set ``ctx`` (default: the current context) on the transaction open on ``conn``.

    Must be called inside a transaction; in autocommit mode outside a transaction block the
    setting would end with its own statement, so that is refused.
    """
    if conn.info.transaction_status != _INTRANS:
        raise psycopg.ProgrammingError(
            "apply_context() needs an open transaction: use threadline.transaction(conn)"
        )
    psycopg.Cursor(conn).execute(SET_CONTEXT_SQL, [context_payload(ctx)])


async def apply_context_async(conn: psycopg.AsyncConnection[Any], ctx: AuditContext | None = None) -> None:
    """Async twin of :func:`apply_context`."""
    if conn.info.transaction_status != _INTRANS:
        raise psycopg.ProgrammingError(
            "apply_context_async() needs an open transaction: use threadline.transaction(conn)"
        )
    await psycopg.AsyncCursor(conn).execute(SET_CONTEXT_SQL, [context_payload(ctx)])


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
        nested = conn.info.transaction_status == _INTRANS
        self._sync = conn.transaction(*self._args)
        tx = self._sync.__enter__()
        if not isinstance(conn, ThreadlineConnection):
            try:
                if nested:
                    row = psycopg.Cursor(conn).execute(_SWAP_SQL, [context_payload()]).fetchone()
                    self._outer_value = row[0] or "" if row is not None else ""
                else:
                    psycopg.Cursor(conn).execute(set_local_command(conn, context_payload()))
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
        if (
            isinstance(conn, psycopg.Connection)
            and outer is not None
            and conn.info.transaction_status == _INTRANS
        ):
            # a released savepoint keeps its setting: give the outer transaction its own back
            psycopg.Cursor(conn).execute(set_local_command(conn, outer))
        return result

    async def __aenter__(self) -> psycopg.AsyncTransaction:
        conn = self._conn
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError("use `with threadline.transaction(conn)` for a synchronous Connection")
        nested = conn.info.transaction_status == _INTRANS
        self._async = conn.transaction(*self._args)
        tx = await self._async.__aenter__()
        try:
            if nested:
                cur = await psycopg.AsyncCursor(conn).execute(_SWAP_SQL, [context_payload()])
                row = await cur.fetchone()
                self._outer_value = row[0] or "" if row is not None else ""
            else:
                await psycopg.AsyncCursor(conn).execute(set_local_command(conn, context_payload()))
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
        if (
            isinstance(conn, psycopg.AsyncConnection)
            and outer is not None
            and conn.info.transaction_status == _INTRANS
        ):
            await psycopg.AsyncCursor(conn).execute(set_local_command(conn, outer))
        return result


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
            conn._begin_in_statement = False
        for _ in prefix:
            self.nextset()
        return self

    def _execute_opening(
        self, conn: ThreadlineConnection[Any], query: Any, params: Any
    ) -> ThreadlineCursor[Row]:
        # The first statement of an implicit transaction, bound client-side: BEGIN, SET LOCAL and
        # the statement go as one simple query, where psycopg would have sent BEGIN alone first.
        ctx = _current.get()
        conn._begin_in_statement = True
        self._execute_prefixed(conn, [conn._get_tx_start_command(), conn._set_local(ctx)], query, params)
        conn._applied = ctx
        return self

    def _execute_autocommit(
        self, conn: ThreadlineConnection[Any], query: Any, params: Any, kwargs: dict[str, Any]
    ) -> ThreadlineCursor[Row]:
        if isinstance(self, psycopg.ClientCursor) and not any(kwargs.values()) and conn._pipeline is None:
            # Parameters are bound client-side anyway: the setting and the statement go as one
            # simple query, which the server runs as one implicit transaction.
            return self._execute_prefixed(conn, [conn._set_local(_current.get())], query, params)
        with conn.pipeline():
            psycopg.Cursor(conn).execute(SET_CONTEXT_SQL, [context_payload()])
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
        """Like :meth:`psycopg.Cursor.stream`, with the current context applied first."""
        conn = self.connection
        if isinstance(conn, ThreadlineConnection):
            conn._prepare_statement()
        return super().stream(query, params, **kwargs)

    @contextlib.contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[psycopg.Copy]:
        """Like :meth:`psycopg.Cursor.copy`, with the current context applied first."""
        conn = self.connection
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


_combined_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}
_combined_lock = threading.Lock()


def _combined(mixin: type[Any], cls: type[Any]) -> type[Any]:
    """``cls`` itself if it is already a ``mixin``, else the subclass of both (made once per pair)."""
    if issubclass(cls, mixin):
        return cls
    with _combined_lock:
        out = _combined_classes.get((mixin, cls))
        if out is None:
            out = type(f"Threadline{cls.__name__}", (mixin, cls), {})
            _combined_classes[(mixin, cls)] = out
        return out


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
      with the statement. ``executemany`` runs its batch in one transaction; use a transaction
      for ``stream()`` and ``copy()``.
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

    # set while a cursor sends BEGIN itself, in front of the statement (see ThreadlineCursor)
    _begin_in_statement = False

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
        # transaction. Threadline's cursors have opened it already (with the context); a cursor
        # made directly (psycopg.Cursor(conn), psycopg.ClientCursor(conn)) has not: its
        # transaction opens here, with BEGIN and SET LOCAL in one message (inside a transaction()
        # block, SET LOCAL alone). In autocommit mode it gets no context: see the class docs.
        if self._begin_in_statement:
            return
        ctx = _current.get()
        status = self.pgconn.transaction_status
        if ctx.is_empty or self._autocommit or self._pipeline is not None:
            yield from super()._start_query()
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
            if ctx.is_empty or self._autocommit:
                return
            if self._pipeline is not None:
                # in pipeline mode nothing may be sent synchronously: psycopg queues its own BEGIN
                # and the setting follows it in the same pipeline (still no extra round trip)
                self._applied = ctx  # before: _start_query() must not send it a second time
                psycopg.Cursor(self).execute(self._set_local(ctx))
            else:
                _exec_begin(self, self._get_tx_start_command() + b"; " + self._set_local(ctx))
            self._applied = ctx
        elif status == _INTRANS:
            applied = self._applied
            if applied is ctx or (applied is None and ctx.is_empty) or applied == ctx:
                return
            self._applied = ctx  # before: _start_query() must not send it a second time
            try:
                psycopg.Cursor(self).execute(self._set_local(ctx))
            except BaseException:
                self._applied = applied
                raise

    def _set_local(self, ctx: AuditContext) -> bytes:
        """``SET LOCAL`` of ``ctx``, quoted once per context object (once per transaction while a
        payload enricher is installed: its value may change under the same context)."""
        if _payload_enricher is not None:
            return set_local_command(self, context_payload(ctx))
        cached = self.__dict__.get("_set_local_cache")
        if cached is None or cached[0] is not ctx:
            command = b"SET LOCAL " + CONTEXT_SETTING.encode() + b" = "
            # the plain value (never an enricher's): the cache outlives an enricher's uninstall
            payload = "" if ctx.is_empty else ctx.to_json()
            cached = (ctx, command + sql.Literal(payload).as_bytes(self))
            self._set_local_cache = cached
        return cached[1]


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
    enrich = _payload_enricher
    payload = ctx.to_json() if enrich is None or ctx.is_empty else enrich(ctx)
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


class SavepointAwareCursor(ThreadlineCursor[Row]):
    """A :class:`ThreadlineCursor` for code that rolls savepoints back with SQL text.

    ORMs (Django, SQLAlchemy) send ``ROLLBACK TO SAVEPOINT`` through a cursor instead of
    ``conn.transaction()``; a ``SET LOCAL`` made inside the savepoint is undone with it, so the
    next statement sets the context again.
    """

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> SavepointAwareCursor[Row]:
        """Like :meth:`ThreadlineCursor.execute`; a ``ROLLBACK TO SAVEPOINT`` forgets the context."""
        super().execute(query, params, **kwargs)
        if query.__class__ is str and query.startswith("ROLLBACK TO SAVEPOINT"):
            conn = self.connection
            if isinstance(conn, ThreadlineConnection):
                conn._applied = None
        return self


def _bridged_connection_class(cls: type[Any]) -> type[Any]:
    return ThreadlineConnection if cls is psycopg.Connection else _combined(ThreadlineConnection, cls)


def bridge(conn: psycopg.Connection[Any]) -> None:
    """Make an open psycopg connection a :class:`ThreadlineConnection`, in place (idempotent).

    For connections created by someone else (an ORM's pool): the object, its socket and its state
    are kept, only its class changes (the subclass adds no slots), and its cursors become
    :class:`SavepointAwareCursor` subclasses of the cursor class it had. Raises
    :class:`~threadline.core.errors.ConfigurationError` for anything but a ``psycopg.Connection``.
    """
    if not isinstance(conn, psycopg.Connection):
        raise ConfigurationError(
            f"bridge() needs a psycopg 3 Connection, got {type(conn).__module__}.{type(conn).__name__}"
        )
    if not isinstance(conn, ThreadlineConnection):
        conn.__class__ = _bridged_connection_class(type(conn))
        conn._applied = None  # type: ignore[attr-defined]
    conn.cursor_factory = _combined(SavepointAwareCursor, conn.cursor_factory)
    conn.server_cursor_factory = threadline_server_cursor_class(conn.server_cursor_factory)


def _kept(tx: psycopg.Transaction | None) -> bool:
    """True when the transaction block ``tx`` was left without rolling back. psycopg before 3.3
    does not tell (``Transaction.status`` is new in 3.3): the answer is then no, and the context is
    applied again at the next statement (one more ``SET LOCAL``, never a missing one)."""
    status = getattr(tx, "status", None)
    return status is not None and status.name in ("ACTIVE", "COMMITTED")
