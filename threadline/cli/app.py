"""The ``threadline`` command line."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from threadline import __version__
from threadline.cli.connect import connect, dsn_option
from threadline.cli.demo import demo
from threadline.cli.export import export
from threadline.cli.help import ALL_EXAMPLES, audit_schema_option, examples
from threadline.cli.ops import coverage, purge
from threadline.cli.output import echo
from threadline.cli.partitions import partitions
from threadline.cli.read import actions, history, timeline, trace
from threadline.cli.story import (
    actor_option,
    as_of,
    baseline,
    batch_size_option,
    command_context,
    revert,
    run_baseline,
)
from threadline.cli.trust import erase, seal, verify
from threadline.core.actor import ActorRef
from threadline.core.errors import SchemaError, TrackingError, UnknownTable
from threadline.ddl import registry, triggers
from threadline.ddl import schema as ddl_schema
from threadline.ddl.names import qualified_name
from threadline.ops.baseline import baseline_sql
from threadline.ops.partitions import is_partitioned


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in (p.strip() for p in value.split(",")) if v]


@click.group(epilog=ALL_EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="threadline")
def cli() -> None:
    """Audit trail for PostgreSQL apps on Celery: install the schema, track tables."""


def main(argv: list[str] | None = None, prog_name: str = "threadline") -> None:
    """Console entry point: bad arguments exit 2 with one line, failures exit 1."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else prog_name
        echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        echo("Aborted.", err=True)
        sys.exit(1)


@cli.command(epilog=examples("install"))
@dsn_option
@audit_schema_option
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of running it (no database needed).")
@click.option("--app-role", metavar="ROLE", help="Let ROLE read the audit tables but never write them.")
@click.option(
    "--schema-version",
    "version",
    type=int,
    default=ddl_schema.SCHEMA_VERSION,
    show_default=True,
    help="With --print-sql: the pinned schema version to print (its SQL never changes).",
)
@click.option(
    "--partition-by",
    type=click.Choice([*ddl_schema.PARTITION_PERIODS, "none"]),
    default=ddl_schema.DEFAULT_PARTITION_BY,
    show_default=True,
    help="A new install's audit tables are range-partitioned by this period (none: plain tables).",
)
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="An upgrade waits at most this long for each lock of the audit tables (the application's "
    "writes queue behind it), and tries again up to 5 times.",
)
def install(
    dsn: str | None,
    audit_schema: str,
    print_sql: bool,
    app_role: str | None = None,
    version: int = 0,
    partition_by: str = ddl_schema.DEFAULT_PARTITION_BY,
    lock_timeout: float = 2.0,
) -> None:
    """Create or upgrade the audit schema (idempotent).

    A new install is partitioned by month unless --partition-by says otherwise; an existing one
    keeps its layout (`threadline partitions --migrate` partitions a plain one online).
    """
    period = None if partition_by == "none" else partition_by
    if print_sql:
        try:
            click.echo(
                ddl_schema.install_sql(audit_schema, app_role=app_role, version=version, partition_by=period),
                nl=False,
            )
        except SchemaError as exc:
            raise click.UsageError(str(exc)) from exc
        return
    try:
        ddl_schema.install_sql(audit_schema)
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    with connect(dsn) as conn:
        result = ddl_schema.install(
            conn, audit_schema, app_role=app_role, partition_by=period, lock_timeout=lock_timeout
        )
    if not result.changed:
        echo(f"schema {audit_schema} is up to date (version {result.version})")
    elif result.previous_version is None:
        echo(f"installed schema {audit_schema} (version {result.version})")
    elif result.refreshed:
        echo(
            f"brought schema {audit_schema} up to date with this release (version {result.version},"
            " written by another build of it)"
        )
    else:
        echo(f"upgraded schema {audit_schema} from version {result.previous_version} to {result.version}")
    if result.previous_version is not None:
        given = click.get_current_context().get_parameter_source("partition_by")
        if given is not None and given.name == "COMMANDLINE":
            with connect(dsn) as conn:
                parted = is_partitioned(conn, audit_schema)
            if parted != (period is not None):
                echo(
                    f"--partition-by {partition_by} applies to a new install only: this store keeps its layout"
                    f" ({'partitioned' if parted else 'plain tables'}"
                    + ("; `threadline partitions --migrate` partitions it online)" if not parted else ")"),
                    err=True,
                )
    if result.follows_ddl:
        echo("capture code follows every ALTER TABLE by itself (DDL event triggers installed)")
    else:
        echo(
            "no DDL event triggers (they need a superuser): capture code is drift-safe, never fails a "
            "write after a schema change, and `threadline sync` brings it up to date"
        )


@cli.command(epilog=examples("track"))
@click.argument("tables", nargs=-1, required=True, metavar="[SCHEMA.]TABLE...")
@click.option("--exclude", metavar="COL,...", help="Also exclude these columns (never recorded).")
@click.option("--mask", metavar="COL,...", help="Also mask these columns (recorded as a fixed placeholder).")
@click.option(
    "--unmask", metavar="COL,...", help="Stop masking these columns (their values are recorded again)."
)
@click.option("--include", metavar="COL,...", help="Stop excluding these columns (they are recorded again).")
@click.option("--keys", metavar="COL,...", help="Columns that identify a row (default: the primary key).")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a column whose name looks secret and is neither masked nor excluded.",
)
@dsn_option
@audit_schema_option
@click.option(
    "--print-sql",
    is_flag=True,
    help="Print the SQL-API statement for a migration instead (no database needed).",
)
@click.option(
    "--baseline",
    "with_baseline",
    is_flag=True,
    help="Then record every existing row once (see threadline baseline).",
)
@batch_size_option
@actor_option
def track(
    tables: tuple[str, ...],
    exclude: str | None,
    mask: str | None,
    unmask: str | None,
    include: str | None,
    keys: str | None,
    strict: bool,
    dsn: str | None,
    audit_schema: str,
    print_sql: bool,
    with_baseline: bool,
    batch_size: int,
    actor: ActorRef,
) -> None:
    """Track tables, or regenerate their capture code with the options stored for them.

    Options add to what is stored (--mask, --exclude) or take away from it (--unmask,
    --include); running it again with no options never changes them.
    """
    options: dict[str, Any] = {
        "exclude": _names(exclude),
        "mask": _names(mask),
        "unmask": _names(unmask),
        "include": _names(include),
        "keys": _names(keys),
        "strict": strict,
        "audit_schema": audit_schema,
    }
    if print_sql:
        for table in tables:
            try:
                click.echo(triggers.track_sql(table, **options), nl=False)
                if with_baseline:
                    echo(baseline_sql(table, batch_size=batch_size, audit_schema=audit_schema), nl=False)
            except (TrackingError, SchemaError) as exc:
                raise click.UsageError(str(exc)) from exc
        return
    with connect(dsn) as conn, command_context("track", actor), _quiet(triggers.logger):
        for table in tables:
            result = triggers.track(conn, table, **options)
            _print_track(result)  # prints the warnings the library logs, with what to do
            if with_baseline:
                run_baseline(
                    conn, qualified_name(result.table_schema, result.table_name), batch_size, audit_schema
                )


def _print_track(result: registry.TrackResult) -> None:
    name = qualified_name(result.table_schema, result.table_name)
    shown = {
        "keys": result.keys,
        "exclude": result.exclude,
        "mask": result.mask,
    }
    before = {
        "keys": result.previous_keys,
        "exclude": result.previous_exclude,
        "mask": result.previous_mask,
    }
    verb = {
        "tracked": "tracking",
        "regenerated": "regenerated capture of",
        "unchanged": "capture is current on",
    }
    echo(f"{verb.get(result.action, result.action)} {name} ({result.mode} capture)")
    for option, now in shown.items():
        was = before[option]
        text = ", ".join(now) or "-"
        if was is not None and tuple(was) != tuple(now):
            echo(f"  {option}: {', '.join(was) or '-'} -> {text}")
        else:
            echo(f"  {option}: {text}")
    if result.unprotected:
        echo(
            f"Warning: {name}: column(s) {', '.join(result.unprotected)} look secret and are neither "
            "masked nor excluded (--mask or --exclude them; --strict refuses this)",
            err=True,
        )
    if not result.keys_unique:
        echo(
            f"Warning: {name}: no unique index or primary key covers the key column(s)"
            f" {', '.join(result.keys)} (an index over columns that may be NULL does not): rows that share"
            " a key share a history, and revert refuses them (--keys naming NOT NULL columns a unique"
            " index covers)",
            err=True,
        )


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Hold back ``logger``'s warnings inside the block (the command prints its own)."""
    held = logging.Filter(name="threadline.cli.held")  # lets through nothing from other names
    logger.addFilter(held)
    try:
        yield
    finally:
        logger.removeFilter(held)


@cli.command(epilog=examples("untrack"))
@click.argument("tables", nargs=-1, metavar="[SCHEMA.]TABLE...")
@click.option("--prune", is_flag=True, help="Also remove capture code whose table or registry row is gone.")
@click.option(
    "--forget",
    is_flag=True,
    help="Also forget the tables' masks and excludes (kept otherwise, for when they are tracked again).",
)
@dsn_option
@audit_schema_option
@click.option("--print-sql", is_flag=True, help="Print the SQL-API statement for a migration instead.")
def untrack(
    tables: tuple[str, ...], prune: bool, forget: bool, dsn: str | None, audit_schema: str, print_sql: bool
) -> None:
    """Remove capture triggers from tables (audit rows already written stay).

    The tables' masks and excludes are kept: tracking a table again hides the same columns.
    --forget drops them."""
    if not tables and not prune:
        raise click.UsageError("name at least one table, or pass --prune")
    if print_sql:
        if prune:
            raise click.UsageError("--prune looks at the database and cannot be printed: run it, or use sync")
        for table in tables:
            try:
                click.echo(triggers.untrack_sql(table, audit_schema=audit_schema, forget=forget), nl=False)
            except (TrackingError, SchemaError) as exc:
                raise click.UsageError(str(exc)) from exc
        return
    with connect(dsn) as conn:
        for table in tables:
            if triggers.untrack(conn, table, audit_schema=audit_schema, forget=forget):
                echo(f"stopped tracking {table}")
            else:
                echo(f"{table} was not tracked" + ("; forgot what it kept" if forget else "; nothing to do"))
            _echo_kept(conn, table, audit_schema)
        if prune:
            pruned = [a for a in triggers.sync(conn, audit_schema=audit_schema) if a.action == "pruned"]
            for action in pruned:
                echo(f"pruned {_sync_name(action)} ({action.detail})")
            if not pruned:
                echo("nothing to prune")


def _echo_kept(conn: Any, table: str, audit_schema: str) -> None:
    try:
        mask, exclude = triggers.kept_options(conn, table, audit_schema=audit_schema)
    except UnknownTable:
        return  # a dropped table's registry row: nothing to track again
    if mask or exclude:
        echo(
            f"  kept for when it is tracked again: masks {', '.join(mask) or '-'};"
            f" excludes {', '.join(exclude) or '-'} (untrack --forget drops them)"
        )


def _sync_name(action: registry.SyncAction) -> str:
    return (
        qualified_name(action.table_schema, action.table_name) if action.table_name else "a capture function"
    )


@cli.command(epilog=examples("sync"))
@click.option("--no-prune", is_flag=True, help="Keep capture code whose table or registry row is gone.")
@click.option("--check", is_flag=True, help="Change nothing: exit 1 if any table needs a sync.")
@dsn_option
@audit_schema_option
def sync(no_prune: bool, check: bool, dsn: str | None, audit_schema: str) -> None:
    """Bring every tracked table to its stored configuration (after renames and column changes,
    or an upgrade) and remove capture code whose table is gone."""
    with connect(dsn) as conn:
        if check:
            # what a sync would change (a disabled trigger is left to whoever disabled it)
            stale = [
                t
                for t in triggers.tracked_tables(conn, audit_schema)
                if t.status not in ("installed", "disabled")
            ]
            for t in stale:
                echo(f"{t.name}: {t.status}" + (f" ({t.detail})" if t.detail else ""))
            if stale:
                sys.exit(1)
            echo("every tracked table is installed and current")
            return
        actions = triggers.sync(conn, prune=not no_prune, audit_schema=audit_schema)
    if not actions:
        echo("no tracked tables")
    for action in actions:
        echo(f"{_sync_name(action)}: {action.action}" + (f" ({action.detail})" if action.detail else ""))


# ---------------------------------------------------------------------------------------------
# Exploring the audit trail: timeline, history, trace, export, actions


cli.add_command(timeline)
cli.add_command(history)
cli.add_command(trace)
cli.add_command(export)
cli.add_command(actions)
cli.add_command(purge)
cli.add_command(coverage)
cli.add_command(baseline)
cli.add_command(as_of)
cli.add_command(revert)
cli.add_command(seal)
cli.add_command(verify)
cli.add_command(erase)
cli.add_command(partitions)
cli.add_command(demo)

if __name__ == "__main__":  # pragma: no cover
    main()
