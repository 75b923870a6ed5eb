"""Bridging a psycopg connection someone else opened (an ORM's) into automatic mode, in place.

Switching an open connection's class is the one step here that relies on psycopg internals (see
:mod:`threadline.propagation.psycopg_internals`); the cursors it installs are its subclasses.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import Row

from threadline.core.errors import ConfigurationError
from threadline.propagation.combined_classes import _combined
from threadline.propagation.psycopg_internals import (
    ThreadlineConnection,
    ThreadlineCursor,
    threadline_server_cursor_class,
)

__all__ = ["SavepointAwareCursor", "bridge"]


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
