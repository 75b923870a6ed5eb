"""What the commands that read the audit trail share: a connection to an installed audit schema
whose bad query arguments are usage errors (:func:`reader`), and the options that filter
changes (:func:`filter_options`, :func:`actor_value`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import psycopg

from threadline.cli.connect import F, connect, when_option_value
from threadline.core.actor import ActorRef
from threadline.core.errors import InvalidActor, QueryError, SchemaError
from threadline.core.records import OPS
from threadline.ddl import schema as ddl_schema

__all__ = ["actor_value", "filter_options", "reader"]


def actor_value(ctx: click.Context, param: click.Parameter, value: str | None) -> ActorRef | None:
    """Callback of an ``--actor TYPE:ID`` option: the :class:`ActorRef`, or a usage error."""
    if value is None:
        return None
    try:
        return ActorRef.parse(value)
    except InvalidActor as exc:
        raise click.BadParameter(exc.problem) from exc


def filter_options(func: F) -> F:
    """The options that filter changes: ``--correlation-id``, ``--table``, ``--actor``, ``--op``,
    ``--since`` and ``--until``."""
    for option in reversed(
        [
            click.option("--correlation-id", metavar="ID", help="Only changes of this correlation id."),
            click.option("--table", metavar="[SCHEMA.]TABLE", help="Only changes of this table."),
            click.option(
                "--actor",
                metavar="TYPE:ID",
                callback=actor_value,
                help="Only changes by this actor (user:42).",
            ),
            click.option("--op", type=click.Choice(OPS), help="Only this operation."),
            click.option(
                "--since",
                metavar="WHEN",
                callback=when_option_value,
                help="Captured at or after (2h, ISO time).",
            ),
            click.option(
                "--until", metavar="WHEN", callback=when_option_value, help="Captured before (2h, ISO time)."
            ),
        ]
    ):
        func = option(func)
    return func


@contextmanager
def _query_errors() -> Iterator[None]:
    """Bad query arguments found by the library are usage errors (exit 2)."""
    try:
        yield
    except QueryError as exc:
        raise click.UsageError(str(exc)) from exc


@contextmanager
def reader(dsn: str | None, audit_schema: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the installed audit schema ``audit_schema``; a bad schema name or query
    argument is a usage error."""
    try:
        ddl_schema.install_sql(audit_schema)
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    with connect(dsn) as conn, _query_errors():
        ddl_schema.require_installed(conn, audit_schema)
        yield conn
