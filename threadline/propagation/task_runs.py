"""A record of every Celery task attempt, written by the worker when the attempt ends.

The audit trail itself only knows the tasks that wrote something, and only the attempts whose
writes committed. With ``threadline.celery.install(app, record_task_runs=dsn)`` the worker also
writes one ``task_runs`` row per attempt (task id and name, attempt number, outcome, the error of
a failed or retried attempt, the context it ran under, the worker, start and end), so
:func:`threadline.trace` can name every task and give each attempt's outcome.

The task never waits for that row: :meth:`TaskRunRecorder.record` appends it to an in-memory
queue (about a microsecond), and a thread of the worker process writes the queue in batches with
``COPY``, every ``flush_interval`` seconds, and when the worker process shuts down. A database
that cannot be reached delays the rows (they are kept, up to ``max_pending`` of them, and written
when it is back) and is logged; it never fails a task. A worker process killed outright loses the
rows of its last ``flush_interval``; the attempts of those tasks that wrote something still
appear in the trace, without an outcome. A row the table can never take (a value out of a
column's range, text PostgreSQL refuses) is logged as an error and counted in
:attr:`TaskRunRecorder.rejected`; the rows beside it are written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name

__all__ = ["COLUMNS", "OUTCOMES", "TaskRunRecorder"]

logger = logging.getLogger("threadline.celery")

OUTCOMES = {
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "RETRY": "retried",
    "REJECTED": "rejected",
    "IGNORED": "ignored",
}
"""Celery's final states of an attempt, and the outcome recorded for each."""

COLUMNS = (
    "task_id",
    "name",
    "attempt",
    "outcome",
    "error",
    "correlation_id",
    "causation_id",
    "parent_id",
    "root_id",
    "actor",
    "worker",
    "started_at",
    "ended_at",
)
"""The ``task_runs`` columns a recorded row gives, in order."""

Connect = Callable[[], "psycopg.Connection[Any]"]

_BATCH = 1000


# Binary COPY: about a third of the client's cost per row of text COPY. The actor travels as jsonb's
# binary form (a version byte, then the JSON text), so it is declared as bytes here.
_TYPES = ["text", "text", "int4", "text", "text", "text", "text", "text", "text", "bytea", "text",
          "timestamptz", "timestamptz"]  # fmt: skip
_JSONB_VERSION = b"\x01"
_INT4 = 2**31 - 1


def _binary_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A queued row as the binary COPY takes it: an attempt out of ``int4``'s range at its bound,
    the actor's JSON text as jsonb bytes, Unix times (``float``) as aware datetimes."""
    values = list(row)
    attempt = values[2]
    if type(attempt) is int and not -_INT4 - 1 <= attempt <= _INT4:
        values[2] = max(-_INT4 - 1, min(attempt, _INT4))  # the binary dump would keep its low bits
    actor = values[9]
    if isinstance(actor, str):
        values[9] = _JSONB_VERSION + actor.encode()
    for i in (11, 12):
        if isinstance(values[i], float):
            values[i] = datetime.fromtimestamp(values[i], timezone.utc)
    return tuple(values)


def _rows_fault(exc: Exception) -> bool:
    """Whether a failed write was the rows' fault (a value the table or the COPY refuses), not
    the database's: such a row is refused again however often it is sent."""
    if isinstance(exc, psycopg.Error):
        return isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))
    return isinstance(exc, (ValueError, TypeError, OverflowError, IndexError))


def _label(row: object) -> str:
    """The task's name and id of a queued row, for a log line, whatever the row holds."""
    values = row if isinstance(row, tuple) else ()
    name, task_id = (values[1:2] or ("?",))[0], (values[:1] or ("?",))[0]
    return f"task {str(name)[:200]}[{str(task_id)[:200]}]"


def _call(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    bound = method()
    if bound is not None:
        bound()


class TaskRunRecorder:
    """Writes task-run rows to ``<audit_schema>.task_runs`` in the background, in batches.

    ``connect`` is a DSN or a function returning a new psycopg connection (e.g. from the
    application's settings); it is called in each worker process that records, never shared
    across a fork.
    """

    def __init__(
        self,
        connect: str | Connect,
        audit_schema: str = DEFAULT_SCHEMA,
        *,
        flush_interval: float = 0.2,
        max_pending: int = 100_000,
    ) -> None:
        if isinstance(connect, str):
            dsn = connect
            self._connect: Connect = lambda: psycopg.connect(dsn)
        elif callable(connect):
            self._connect = connect
        else:
            raise ConfigurationError(
                f"record_task_runs must be a DSN or a function returning a psycopg connection, got {connect!r}"
            )
        if (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, (int, float))
            or not 0 < flush_interval <= 60
        ):
            raise ConfigurationError(
                f"flush_interval must be a number of seconds from 0 to 60, got {flush_interval!r}"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigurationError(f"max_pending must be a positive integer, got {max_pending!r}")
        self._copy = sql.SQL("COPY {}.task_runs ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(check_schema_name(audit_schema)), sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        )
        self.flush_interval = float(flush_interval)
        self.max_pending = max_pending
        self._closed = False
        self._failing = False
        self.dropped = 0
        """Rows dropped because more than ``max_pending`` were waiting for the database."""
        self.rejected = 0
        """Rows the table refused (each logged as an error): they could never be written."""
        self._reset()
        # A fork hook cannot be removed: it holds the recorder weakly, so a recorder that is
        # replaced (install() again) can be freed.
        reset = weakref.WeakMethod(self._reset)
        os.register_at_fork(after_in_child=lambda: _call(reset))

    def _reset(self) -> None:
        # A new process (or a fork's child): no thread, no connection, fresh locks (a lock held
        # by a thread of the parent at the fork would never be released here), and none of the
        # parent's queued rows, which the parent writes itself.
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._io = threading.Lock()
        self._starting = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0
        self._conn: psycopg.Connection[Any] | None = None

    def record(self, row: tuple[Any, ...]) -> None:
        """Queue one row (values in :data:`COLUMNS` order: the actor as JSON text, times as Unix
        time ``float`` or aware ``datetime``). Never raises, never waits."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._start()
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(row)

    def _start(self) -> None:
        with self._starting:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            thread = threading.Thread(target=self._run, name="threadline-task-runs", daemon=True)
            thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while not self._closed and self._pid == pid:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write every queued row now, in the calling thread; ``False`` when the database could
        not take them (they stay queued)."""
        with self._io:
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                try:
                    self._write(batch)
                except Exception as exc:  # never let the record fail or stop a worker
                    if self._conn is not None and _rows_fault(exc):
                        batch = self._write_each(batch)
                        if not batch:
                            continue
                    self._pending.extendleft(reversed(batch))
                    self._disconnect()
                    if not self._failing:
                        logger.warning(
                            "task runs are not being recorded (%d waiting): %s; retrying every %.1fs",
                            len(self._pending),
                            exc,
                            self.flush_interval,
                        )
                    self._failing = True
                    return False
            if self._failing:
                logger.warning("task runs are recorded again")
                self._failing = False
            return True

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            self._conn = None
            conn = self._connect()
            conn.autocommit = False
            self._conn = conn
        try:
            with conn.cursor() as cur, cur.copy(self._copy) as copy:
                copy.set_types(_TYPES)
                for row in batch:
                    copy.write_row(_binary_row(row))
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    def _write_each(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Write a refused batch row by row, leaving out the rows the table refuses; the rows not
        written when the database itself fails."""
        for i, row in enumerate(batch):
            try:
                self._write([row])
            except Exception as exc:
                if self._conn is None or not _rows_fault(exc):
                    return batch[i:]
                self.rejected += 1
                logger.error("a task run cannot be recorded, left out (%s): %s", _label(row), exc)
        return []

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                conn.close()

    def close(self) -> bool:
        """Write what is queued and stop; returns whether everything queued was written."""
        written = True
        if self._pid == os.getpid():
            written = self.flush()
            self._closed = True
            self._wake.set()
            with self._io:
                self._disconnect()
        self._closed = True
        return written
