"""What every ``threadline`` command that reads or writes a database shares: the ``--dsn``
option, where the DSN comes from, and one connection whose errors become one clear line and an
exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import psycopg

from threadline.errors import SchemaError, ThreadlineError, TrackingError

F = TypeVar("F", bound=Callable[..., Any])


def dsn_option(func: F) -> F:
    """The ``--dsn`` option."""
    return click.option(
        "--dsn",
        metavar="DSN",
        help="PostgreSQL connection string (default: $THREADLINE_DSN, then $DATABASE_URL).",
    )(func)


def resolve_dsn(dsn: str | None) -> str:
    """``--dsn``, else ``$THREADLINE_DSN``, else ``$DATABASE_URL``; a usage error without any."""
    found = dsn or os.environ.get("THREADLINE_DSN") or os.environ.get("DATABASE_URL")
    if not found:
        raise click.UsageError("no database given: pass --dsn or set THREADLINE_DSN or DATABASE_URL")
    return found


def fail(message: str, hint: str | None = None) -> None:
    """Print ``Error: message`` (and a hint) to stderr and exit with status 1."""
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    sys.exit(1)


@contextmanager
def connect(dsn: str | None) -> Iterator[psycopg.Connection[Any]]:
    """Connect, and turn database and threadline errors into one clear line and an exit code."""
    url = resolve_dsn(dsn)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
    except TrackingError as exc:
        raise click.UsageError(str(exc)) from exc
    except SchemaError as exc:
        fail(str(exc))
    except ThreadlineError as exc:
        fail(str(exc))
    except psycopg.OperationalError as exc:
        fail(
            str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect",
            "check the DSN and that PostgreSQL is running and reachable",
        )
    except psycopg.Error as exc:
        diag = getattr(exc, "diag", None)
        hint = getattr(diag, "message_hint", None) if diag else None
        fail(str(exc).strip().splitlines()[0], hint or "the statement was rolled back; nothing changed")
