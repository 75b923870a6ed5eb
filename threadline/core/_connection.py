"""The psycopg connection behind what a caller passes: a psycopg connection, or a Django one.

Django's PostgreSQL backend (psycopg 3) wraps its psycopg connection in a ``DatabaseWrapper``
(``django.db.connection``, ``connections["alias"]``) and registers a loader that returns ``json``
and ``jsonb`` values as text, because its ``JSONField`` decodes them itself. threadline's queries
run on the wrapped connection (opened if needed, inside or outside ``atomic()``: the same
transaction as the caller's), with psycopg's own JSON loaders on their cursors only, so they
return exactly what they return on a plain connection and Django's loaders stay as they are.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import psycopg
from psycopg.adapt import AdaptersMap
from psycopg.types.json import JsonbBinaryLoader, JsonBinaryLoader, JsonbLoader, JsonLoader

from threadline.core.errors import ConfigurationError

__all__ = ["ConnectionLike", "DjangoConnection", "json_adapters", "native"]


@runtime_checkable
class DjangoConnection(Protocol):
    """What threadline uses of a Django ``DatabaseWrapper``."""

    vendor: str
    alias: str
    connection: Any

    def ensure_connection(self) -> None:
        """Open the database connection if it is not open."""


ConnectionLike = psycopg.Connection[Any] | DjangoConnection
"""A psycopg connection, or a Django connection on the PostgreSQL (psycopg 3) backend."""


def native(conn: Any) -> tuple[psycopg.Connection[Any], bool]:
    """The psycopg connection behind ``conn``, and whether it came from Django."""
    if isinstance(conn, psycopg.Connection):
        return conn, False
    if isinstance(conn, DjangoConnection):
        if conn.vendor != "postgresql":
            raise ConfigurationError(
                f"Django database {conn.alias!r} is {conn.vendor}: threadline needs PostgreSQL "
                "(ENGINE 'django.db.backends.postgresql' with psycopg 3)"
            )
        conn.ensure_connection()
        raw = conn.connection
        if not isinstance(raw, psycopg.Connection):
            raise ConfigurationError(
                f"Django database {conn.alias!r} runs on {type(raw).__module__}.{type(raw).__name__}: "
                "threadline needs psycopg 3 (pip install 'psycopg[binary]'; Django uses it when "
                "psycopg2 is not installed, or always from Django 4.2 on if psycopg is installed)"
            )
        return raw, True
    raise TypeError(
        f"expected a psycopg connection or a Django connection, got {type(conn).__module__}.{type(conn).__name__}"
    )


def json_adapters(cursor_adapters: AdaptersMap) -> None:
    """Give a cursor psycopg's own JSON loaders (a Django connection's return text)."""
    for name, text, binary in (
        ("json", JsonLoader, JsonBinaryLoader),
        ("jsonb", JsonbLoader, JsonbBinaryLoader),
    ):
        cursor_adapters.register_loader(name, text)
        cursor_adapters.register_loader(name, binary)
