"""Operations commands of the ``threadline`` command line: ``purge`` and ``coverage``.

Registered on :data:`threadline.cli.cli`; they follow its conventions (``--dsn``, bad arguments
exit 2, database errors exit 1 with a hint).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import timedelta

import click

from threadline.cli.connect import connect, dsn_option
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.output import echo
from threadline.core.errors import CoverageError, RetentionError, SchemaError
from threadline.ddl import schema as ddl_schema
from threadline.ops import health, retention


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return retention.parse_age(value)
    except RetentionError as exc:
        raise click.BadParameter(str(exc)) from exc


def _audit_schema(value: str) -> str:
    try:
        ddl_schema.install_sql(value)
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    return value


def _log_to_stderr(verbose: bool) -> None:
    if not verbose:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger("threadline")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


@click.command(epilog=examples("purge"))
@click.option(
    "--older-than",
    "older_than",
    metavar="AGE",
    required=True,
    callback=_age,
    help="Purge changes captured longer ago than this (90d, 12h, 30m, 2w).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, retention.MAX_BATCH_SIZE),
    default=10_000,
    show_default=True,
    help="Rows deleted per transaction.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be purged.")
@click.option("--table", metavar="[SCHEMA.]TABLE", help="Only this table's changes.")
@click.option(
    "--max-batches", type=click.IntRange(1), help="Stop after this many batches (rerun to continue)."
)
@click.option(
    "--pause",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Seconds to sleep between batches.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log each batch to stderr.")
@dsn_option
@audit_schema_option
def purge(
    older_than: timedelta,
    batch_size: int,
    dry_run: bool,
    table: str | None,
    max_batches: int | None,
    pause: float,
    as_json: bool,
    verbose: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Delete old audit changes in small batches, then transactions left with none.

    Each batch is its own short transaction: safe to interrupt and run again.
    """

    _audit_schema(audit_schema)
    _log_to_stderr(verbose)
    with connect(dsn) as conn:
        try:
            result = retention.purge(
                conn,
                older_than,
                batch_size=batch_size,
                dry_run=dry_run,
                table=table,
                audit_schema=audit_schema,
                max_batches=max_batches,
                pause=pause,
            )
        except RetentionError as exc:
            raise click.UsageError(str(exc)) from exc
    if as_json:
        echo(json.dumps(result.to_dict(), indent=2))
        return
    when = result.cutoff.isoformat(timespec="seconds")
    if result.dry_run:
        echo(
            f"dry run: would purge {result.changes} changes, {result.transactions} "
            f"transactions and {result.task_runs} task runs from before {when}"
            + (f" ({result.partitions} partition period(s) dropped whole)" if result.partitions else "")
        )
        return
    echo(
        f"purged {result.changes} changes, {result.transactions} transactions and {result.task_runs} "
        f"task runs from before {when} in {result.batches} batches"
        + (f" and {result.partitions} partition period(s) dropped whole" if result.partitions else "")
        + f" ({result.seconds:.1f} s)"
    )
    if result.head:
        echo(f"head {result.head}")
    if not result.complete:
        echo("stopped at --max-batches: run the command again to continue")


@click.command(epilog=examples("coverage"))
@click.option("--expect", metavar="T1,T2", help="Tables that must be covered: exit 1 if one is not.")
@click.option(
    "--table-schema",
    "schemas",
    metavar="SCHEMA",
    multiple=True,
    help="Only report the tables of this schema (repeatable).",
)
@click.option(
    "--since",
    metavar="AGE",
    default="1d",
    show_default=True,
    callback=_age,
    help="Window of the context coverage (90s, 30m, 24h, 7d).",
)
@click.option("--all", "show_all", is_flag=True, help="List untracked tables too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@dsn_option
@audit_schema_option
def coverage(
    expect: str | None,
    schemas: tuple[str, ...],
    since: timedelta,
    show_all: bool,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Which tables are captured (installed, enabled, current) and which code paths write
    without context. With --expect, a CI gate: exit 1 unless every named table is covered."""

    _audit_schema(audit_schema)
    expected = [p.strip() for p in (expect or "").split(",") if p.strip()]
    if expect is not None and not expected:
        raise click.BadParameter("name at least one table", param_hint="--expect")
    if since <= timedelta(0):
        raise click.BadParameter("must be positive", param_hint="--since")
    with connect(dsn) as conn:
        try:
            report = health.coverage(
                conn, expect=expected, schemas=list(schemas) or None, since=since, audit_schema=audit_schema
            )
        except CoverageError as exc:
            raise click.UsageError(str(exc)) from exc
    if as_json:
        echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, show_all)
    if not report.ok:
        sys.exit(1)


def _print_report(report: health.CoverageReport, show_all: bool) -> None:
    shown = [t for t in report.tables if show_all or t.status != "untracked"]
    untracked = sum(1 for t in report.tables if t.status == "untracked")
    if shown:
        width = max(len(t.name) for t in shown)
        echo(f"{'TABLE'.ljust(width)}  STATUS     INSTALLED  ENABLED  CURRENT  BASELINE")
        for t in shown:
            echo(
                f"{t.name.ljust(width)}  {t.status.ljust(9)}  {'yes' if t.installed else 'no':<9}  "
                f"{'yes' if t.enabled else 'no':<7}  {'yes' if t.current else 'no':<7}  {t.baseline or '-'}"
            )
            if t.status not in ("installed", "untracked"):
                echo(
                    f"{''.ljust(width)}  {t.detail or t.status}"
                    + (f"; run: {t.restore}" if t.restore else "")
                )
    else:
        echo("no tracked tables")
    if untracked and not show_all:
        echo(f"({untracked} untracked table{'s' if untracked != 1 else ''} not listed; --all lists them)")
    echo("")
    if report.contexts:
        rows = [
            (
                c.origin or "(none)",
                c.task or "",
                str(c.transactions),
                _percent(c.no_actor, c.transactions),
                _percent(c.no_correlation_id, c.transactions),
                _percent(c.invalid, c.transactions),
            )
            for c in report.contexts
        ]
        headers = ("ORIGIN", "TASK", "TRANSACTIONS", "NO ACTOR", "NO CORRELATION", "INVALID")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for r in rows:
            echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    else:
        echo("no transactions recorded in the window")
    for line in report.problems:
        echo(f"NOT COVERED: {line}", err=True)
