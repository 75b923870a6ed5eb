"""Names of the audit schema's objects and validation of user-supplied names."""

from __future__ import annotations

import hashlib
import re

from threadline.core.errors import SchemaError

DEFAULT_SCHEMA = "threadline"
CONTEXT_SETTING = "threadline.context"
"""The transaction-local setting that carries the canonical context JSON into PostgreSQL."""

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


def check_schema_name(name: str) -> str:
    """The audit schema's name must be a plain lowercase identifier (it also names settings)."""
    if not isinstance(name, str) or not _SCHEMA_RE.match(name):
        raise SchemaError(
            f"audit schema name {name!r} is not allowed: use a lowercase identifier of at most "
            "40 characters ([a-z_][a-z0-9_]*)"
        )
    return name


def context_cache_setting(schema: str) -> str:
    """Transaction-local setting that marks the transaction's row: ``=<row id>|<context text>``.

    Capture skips looking the row up while it is empty, and the commit-time check compares it with
    the context set last."""
    return f"threadline.txctx_{check_schema_name(schema)}"


def capture_function_name(table_schema: str, table_name: str) -> str:
    """Deterministic name of the generated capture function for one tracked table."""
    digest = hashlib.sha256(f"{table_schema}\x00{table_name}".encode()).hexdigest()[:16]
    return f"capture_{digest}"


def trigger_name(audit_schema: str, op: str) -> str:
    """Name of the capture trigger for one operation on a tracked table."""
    return f"{check_schema_name(audit_schema)}_capture_{op}"


_PLAIN_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote_ident(name: str) -> str:
    """``name`` as PostgreSQL would need it written: double-quoted unless it is a plain lowercase
    identifier, so a shown name is never ambiguous (``"MiXeD.Case"."Or.ders"``)."""
    if _PLAIN_IDENT_RE.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def qualified_name(schema: str | None, name: str | None) -> str:
    """``schema.table`` for display, each part quoted when it needs to be."""
    return f"{quote_ident(schema or '')}.{quote_ident(name or '')}"


SEARCH_PATH_SETTING = "threadline.search_path"
"""Transaction-local setting where a script of :func:`with_pinned_search_path` keeps the
session's ``search_path`` while it runs."""


def with_pinned_search_path(script: str) -> str:
    """``script`` run with ``search_path`` set to ``pg_catalog, pg_temp`` and the session's path
    set again after it, transaction-locally (run it in one transaction).

    A function or operator that another role created in a schema on the session's path, with
    argument types that fit a call better than the built-in's (``format(text, text)`` against
    ``format(text, VARIADIC "any")``), would otherwise be chosen, and run with the rights of
    the role running the script: the owner of the audit schema, often a superuser. In PostgreSQL
    15 the ``public`` schema belongs to the database's owner, often the application's role."""
    return (
        "-- every name resolves in pg_catalog while this runs: no function or operator of a schema\n"
        "-- on the session's search_path can run with this role's rights\n"
        f"SELECT pg_catalog.set_config('{SEARCH_PATH_SETTING}', pg_catalog.current_setting('search_path'), true),\n"
        "       pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);\n"
        f"{script.rstrip()}\n"
        "-- the session's search_path again\n"
        "SELECT pg_catalog.set_config('search_path',"
        f" pg_catalog.current_setting('{SEARCH_PATH_SETTING}'), true);\n"
    )
