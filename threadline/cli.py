"""The ``threadline`` command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import psycopg

from threadline import __version__
from threadline.ddl import schema as ddl_schema
from threadline.ddl import triggers
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.errors import SchemaError, ThreadlineError, TrackingError

F = TypeVar("F", bound=Callable[..., Any])

EXAMPLES = """
\b
Examples:
  threadline install --dsn postgresql://app@localhost/app
  threadline install --print-sql > migrations/0001_threadline.sql
  threadline track public.orders --mask card_number --exclude search_vector
  threadline track line_items --keys order_id,line_no
  threadline untrack orders

The DSN comes from --dsn, else THREADLINE_DSN, else DATABASE_URL.
"""


def _dsn_option(func: F) -> F:
    return click.option(
        "--dsn",
        metavar="DSN",
        help="PostgreSQL connection string (default: $THREADLINE_DSN, then $DATABASE_URL).",
    )(func)


def _schema_option(func: F) -> F:
    return click.option(
        "--schema",
        "audit_schema",
        default=lambda: os.environ.get("THREADLINE_SCHEMA", DEFAULT_SCHEMA),
        show_default="threadline, or $THREADLINE_SCHEMA",
        help="Name of the audit schema.",
    )(func)


def _resolve_dsn(dsn: str | None) -> str:
    found = dsn or os.environ.get("THREADLINE_DSN") or os.environ.get("DATABASE_URL")
    if not found:
        raise click.UsageError("no database given: pass --dsn or set THREADLINE_DSN or DATABASE_URL")
    return found


def _fail(message: str, hint: str | None = None) -> None:
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    sys.exit(1)


@contextmanager
def _connect(dsn: str | None) -> Iterator[psycopg.Connection[Any]]:
    """Connect, and turn database and threadline errors into one clear line and an exit code."""
    url = _resolve_dsn(dsn)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
    except TrackingError as exc:
        raise click.UsageError(str(exc)) from exc
    except SchemaError as exc:
        _fail(str(exc))
    except ThreadlineError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(
            str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect",
            "check the DSN and that PostgreSQL is running and reachable",
        )
    except psycopg.Error as exc:
        diag = getattr(exc, "diag", None)
        hint = getattr(diag, "message_hint", None) if diag else None
        _fail(str(exc).strip().splitlines()[0], hint or "the statement was rolled back; nothing changed")


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in (p.strip() for p in value.split(",")) if v]


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="threadline")
def cli() -> None:
    """Audit trail for PostgreSQL apps on Celery: install the schema, track tables."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad arguments exit 2 with one line, failures exit 1."""
    try:
        cli.main(args=argv, prog_name="threadline", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"Error: {exc.format_message()} (see 'threadline --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)


@cli.command(epilog=EXAMPLES)
@_dsn_option
@_schema_option
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of running it (no database needed).")
@click.option("--app-role", metavar="ROLE", help="Let ROLE read the audit tables but never write them.")
def install(dsn: str | None, audit_schema: str, print_sql: bool, app_role: str | None = None) -> None:
    """Create or upgrade the audit schema (idempotent)."""
    if print_sql:
        try:
            click.echo(ddl_schema.install_sql(audit_schema, app_role=app_role), nl=False)
        except SchemaError as exc:
            raise click.UsageError(str(exc)) from exc
        return
    try:
        ddl_schema.install_sql(audit_schema)
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    with _connect(dsn) as conn:
        result = ddl_schema.install(conn, audit_schema, app_role=app_role)
    if not result.changed:
        click.echo(f"schema {audit_schema} is up to date (version {result.version})")
    elif result.previous_version is None:
        click.echo(f"installed schema {audit_schema} (version {result.version})")
    else:
        click.echo(
            f"upgraded schema {audit_schema} from version {result.previous_version} to {result.version}"
        )


@cli.command(epilog=EXAMPLES)
@click.argument("tables", nargs=-1, required=True, metavar="[SCHEMA.]TABLE...")
@click.option("--exclude", metavar="COL,...", help="Columns never recorded anywhere in the audit rows.")
@click.option("--mask", metavar="COL,...", help="Columns recorded as a fixed placeholder.")
@click.option("--keys", metavar="COL,...", help="Columns that identify a row (default: the primary key).")
@_dsn_option
@_schema_option
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of running it (reads the table).")
def track(
    tables: tuple[str, ...],
    exclude: str | None,
    mask: str | None,
    keys: str | None,
    dsn: str | None,
    audit_schema: str,
    print_sql: bool,
) -> None:
    """Install capture triggers on tables (run again after changing their columns)."""
    options: dict[str, Any] = {
        "exclude": _names(exclude),
        "mask": _names(mask),
        "keys": _names(keys),
        "audit_schema": audit_schema,
    }
    with _connect(dsn) as conn:
        for table in tables:
            if print_sql:
                click.echo(triggers.track_sql(conn, table, **options), nl=False)
                continue
            plan = triggers.track(conn, table, **options)
            click.echo(
                f"tracking {plan.table_schema}.{plan.table_name} "
                f"(keys: {', '.join(plan.keys)}"
                + (f"; excluded: {', '.join(plan.exclude)}" if plan.exclude else "")
                + (f"; masked: {', '.join(plan.mask)}" if plan.mask else "")
                + ")"
            )


@cli.command(epilog=EXAMPLES)
@click.argument("tables", nargs=-1, required=True, metavar="[SCHEMA.]TABLE...")
@_dsn_option
@_schema_option
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of running it.")
def untrack(tables: tuple[str, ...], dsn: str | None, audit_schema: str, print_sql: bool) -> None:
    """Remove capture triggers from tables (audit rows already written stay)."""
    with _connect(dsn) as conn:
        for table in tables:
            if print_sql:
                click.echo(triggers.untrack_sql(conn, table, audit_schema=audit_schema), nl=False)
            elif triggers.untrack(conn, table, audit_schema=audit_schema):
                click.echo(f"stopped tracking {table}")
            else:
                click.echo(f"{table} was not tracked; nothing to do")


from threadline.cli_ops import coverage, purge  # noqa: E402 - operations commands

cli.add_command(purge)
cli.add_command(coverage)

if __name__ == "__main__":  # pragma: no cover
    main()
