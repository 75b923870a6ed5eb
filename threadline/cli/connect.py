"""What every ``threadline`` command that reads or writes a database shares: the ``--dsn``
option, where the DSN comes from, and one connection whose errors become one clear line and an
exit code."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import click
import psycopg

from threadline.cli.output import echo
from threadline.core.busy import TABLES_BUSY
from threadline.core.errors import SchemaError, ThreadlineError, TrackingError

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
    echo(f"Error: {message}", err=True)
    if hint:
        echo(f"Hint: {hint}", err=True)
    sys.exit(1)


@contextmanager
def connect(dsn: str | None) -> Iterator[psycopg.Connection[Any]]:
    """Connect, and turn database and threadline errors into one clear line and an exit code."""
    url = resolve_dsn(dsn)
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.ProgrammingError as exc:  # not a connection string at all
        fail(
            str(exc).strip().splitlines()[0],
            "give a PostgreSQL connection string: postgresql://user@host:5432/dbname, or key=value pairs",
        )
    except psycopg.OperationalError as exc:
        fail(
            str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect",
            "check the DSN and that PostgreSQL is running and reachable",
        )
    try:
        with conn:
            yield conn
    except TrackingError as exc:
        raise click.UsageError(str(exc)) from exc
    except SchemaError as exc:
        fail(str(exc))
    except ThreadlineError as exc:
        fail(str(exc))
    except TABLES_BUSY as exc:  # operational errors too, but the connection is fine
        fail(
            str(exc).strip().splitlines()[0],
            "another session (the application's writers, or a long transaction) held a table this"
            " needs for longer than it waits: the step that waited was rolled back; run the command"
            " again, at a quieter time",
        )
    except psycopg.OperationalError as exc:
        fail(
            str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect",
            "check the DSN and that PostgreSQL is running and reachable",
        )
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.InvalidSchemaName,
        psycopg.errors.UndefinedFunction,
    ) as exc:
        fail(
            str(exc).strip().splitlines()[0],
            "is the audit schema installed in this database? run `threadline install` (and give"
            " --audit-schema when it is not named threadline); nothing changed",
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        fail(
            str(exc).strip().splitlines()[0],
            "this role lacks the privilege: reading the trail needs the grants of `threadline install"
            " --app-role <role>` (run by the audit schema's owner); tracking, purging and sealing are"
            " the owner's",
        )
    except psycopg.Error as exc:
        diag = getattr(exc, "diag", None)
        hint = getattr(diag, "message_hint", None) if diag else None
        fail(str(exc).strip().splitlines()[0], hint or "the statement was rolled back; nothing changed")


_RELATIVE_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """``2h``/``30m``/``1d`` ago, ``now``, or an ISO 8601 time (UTC when it has no offset)."""
    value = text.strip()
    now = now or datetime.now(timezone.utc)
    match = _RELATIVE_RE.match(value)
    if match:
        try:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise ValueError(f"{text!r} reaches before the year 1") from None
    if value == "now":
        return now
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a relative time (90s, 30m, 2h, 1d, 2w) nor an ISO 8601 time"
        ) from None
    parsed = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed
    try:
        parsed.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range once taken to UTC") from None
    return parsed


def when_option_value(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Click callback: the option's value as a time (see :func:`parse_when`)."""
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def parse_key(text: str) -> Any:
    """A row key as the commands take it: ``7``, ``order_id=7,line_no=2`` or a JSON object."""
    value = text.strip()
    if value.startswith("{"):
        try:
            parsed = json.loads(value, object_pairs_hook=_key_object)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="PK") from exc
        if not isinstance(parsed, dict):
            raise click.BadParameter("a JSON key must be an object", param_hint="PK")
        return parsed
    if "=" in value:
        pairs: list[tuple[str, str]] = []
        for part in value.split(","):
            name, sep, item = part.partition("=")
            if not sep or not name.strip():
                raise click.BadParameter(
                    f"{text!r}: write a composite key as col=value,col=value", param_hint="PK"
                )
            pairs.append((name.strip(), item.strip()))
        try:
            return _key_object(pairs)
        except ValueError as exc:
            raise click.BadParameter(f"{text!r}: {exc}", param_hint="PK") from exc
    return value


def _key_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key's columns and values; a column given twice is refused (which value was meant?)."""
    out: dict[str, Any] = {}
    for name, item in pairs:
        if name in out:
            raise ValueError(f"column {name!r} is given twice")
        out[name] = item
    return out
