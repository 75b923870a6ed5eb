"""The connection string of a Django database alias, for threadline's command line."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import conninfo

from threadline.core.errors import ConfigurationError

__all__ = ["dsn_for"]


def dsn_for(alias: str = "default") -> str:
    """The libpq connection string Django itself uses for ``DATABASES[alias]`` (its
    ``get_connection_params()``, without the options only Django understands)."""
    from django.db import connections

    if alias not in connections.settings:
        raise ConfigurationError(
            f"no database {alias!r} in settings.DATABASES (known: {', '.join(sorted(connections.settings))})"
        )
    wrapper: Any = connections[alias]
    if wrapper.vendor != "postgresql":
        raise ConfigurationError(
            f"Django database {alias!r} is {wrapper.vendor}: threadline needs PostgreSQL"
        )
    params = wrapper.get_connection_params()
    known = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    return conninfo.make_conninfo(**{k: v for k, v in params.items() if k in known and v not in (None, "")})
