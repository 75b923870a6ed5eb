"""``threadline baseline``, ``threadline as-of``, ``threadline revert`` and what ``track --baseline``
shares with them: the commands that give a table's whole story (its rows before tracking, the
table at a time) and undo part of it."""

from __future__ import annotations

import csv
import getpass
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from typing import Any

import click
import psycopg

from threadline.cli.connect import connect, dsn_option, fail, when_option_value
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.output import echo
from threadline.cli.reading import reader
from threadline.core.actor import ActorRef
from threadline.core.context import context
from threadline.core.errors import InvalidActor
from threadline.core.json_text import dumps_exact
from threadline.core.printable import encodable, spreadsheet_cell
from threadline.explore.as_of_query import AsOfError
from threadline.explore.as_of_query import as_of as table_as_of
from threadline.explore.revert import RevertError
from threadline.explore.revert import revert as revert_changes
from threadline.ops.baseline import DEFAULT_BATCH_SIZE, BaselineProgress, take_baseline

__all__ = [
    "actor_option",
    "as_of",
    "baseline",
    "batch_size_option",
    "command_context",
    "revert",
    "run_baseline",
]


def _actor(ctx: click.Context, param: click.Parameter, value: str | None) -> ActorRef:
    text = value or os.environ.get("THREADLINE_ACTOR")
    if text:
        try:
            return ActorRef.parse(text)
        except InvalidActor as exc:
            raise click.BadParameter(exc.problem) from exc
    return ActorRef("os_user", getpass.getuser())


def actor_option(func: Any) -> Any:
    """``--actor TYPE:ID``: who the command's writes are attributed to."""
    return click.option(
        "--actor",
        metavar="TYPE:ID",
        callback=_actor,
        help="Whom the writes are attributed to (default: $THREADLINE_ACTOR, else os_user:<login name>).",
    )(func)


def batch_size_option(func: Any) -> Any:
    """``--batch-size N`` of a baseline."""
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="Rows per baseline batch (each batch is one short transaction).",
    )(func)


@contextmanager
def command_context(command: str, actor: ActorRef) -> Iterator[None]:
    """The audit context of a command that writes: its actor, origin ``cli``, a fresh correlation
    id, and the command's name in ``meta``."""
    with context(actor=actor, origin="cli", correlation_id=str(uuid.uuid4()), meta={"command": command}):
        yield


def run_baseline(conn: psycopg.Connection[Any], table: str, batch_size: int, audit_schema: str) -> None:
    """Take ``table``'s baseline, with a progress bar on a terminal and one line at the end."""
    bar: Any = None
    shown = 0

    def step(progress: BaselineProgress) -> None:
        nonlocal bar, shown
        if not sys.stderr.isatty():
            return
        if bar is None:
            bar = click.progressbar(
                length=max(progress.estimated_rows or 0, progress.rows, 1),
                label=f"baseline of {progress.table}",
                file=sys.stderr,
                show_pos=True,
            )
            bar.__enter__()
        bar.length = max(bar.length or 0, progress.rows)
        bar.update(progress.rows - shown)
        shown = progress.rows

    try:
        result = take_baseline(conn, table, batch_size=batch_size, audit_schema=audit_schema, progress=step)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    echo(f"baseline of {result.table}: complete, {result.rows} rows")


@click.command(epilog=examples("baseline"))
@click.argument("tables", nargs=-1, required=True, metavar="[SCHEMA.]TABLE...")
@batch_size_option
@actor_option
@dsn_option
@audit_schema_option
def baseline(
    tables: tuple[str, ...], batch_size: int, actor: ActorRef, dsn: str | None, audit_schema: str
) -> None:
    """Record every row of tracked tables once, as the start of their history.

    Batches commit one by one; run it again after an interruption and it continues where it
    stopped. A table whose baseline is complete is left as it is.
    """
    with connect(dsn) as conn, command_context("baseline", actor):
        for table in tables:
            run_baseline(conn, table, batch_size, audit_schema)


@click.command("as-of", epilog=examples("as-of"))
@click.argument("table", metavar="[SCHEMA.]TABLE")
@click.option(
    "--at", "at", required=True, metavar="WHEN", callback=when_option_value, help="The time (2h, ISO time)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "csv"]),
    default="ndjson",
    show_default=True,
    help="One JSON object per row, or CSV with a header of the columns.",
)
@dsn_option
@audit_schema_option
def as_of(table: str, at: datetime, fmt: str, dsn: str | None, audit_schema: str) -> None:
    """Print the table as it was at a time, from its baseline and its changes.

    Rows are streamed in key order. The table needs a baseline taken before that time
    (threadline baseline). Masked columns show the placeholder; excluded ones are absent.
    """
    with reader(dsn, audit_schema) as conn:
        try:
            rows = table_as_of(conn, table, at=at, audit_schema=audit_schema)
        except AsOfError as exc:
            fail(str(exc))
        with closing(rows):
            try:
                _write_rows(sys.stdout, rows, fmt)
                sys.stdout.flush()
            except BrokenPipeError:  # the reader stopped early (| head): not an error
                # Python flushes stdout once more at exit: point it at /dev/null first
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _write_rows(out: Any, rows: Iterator[dict[str, Any]], fmt: str) -> None:
    writer: Any = None
    for row in rows:
        if fmt == "ndjson":
            out.write(encodable(dumps_exact(row, ensure_ascii=False, separators=(",", ":"))) + "\n")
            continue
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(row), extrasaction="ignore", restval="")
            writer.writeheader()
        writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return encodable(dumps_exact(value, ensure_ascii=False))
    return spreadsheet_cell(encodable(value)) if isinstance(value, str) else value


@click.command(epilog=examples("revert"))
@click.option(
    "--correlation-id", metavar="ID", help="Revert everything this request (and its tasks) changed."
)
@click.option(
    "--transaction",
    "transaction_id",
    type=click.IntRange(min=1),
    metavar="N",
    help="Revert one audit transaction.",
)
@click.option(
    "--task", "task_id", metavar="ID", help="Revert a Celery task (every attempt, and the tasks it started)."
)
@click.option("--dry-run", is_flag=True, help="Show what would change, as a diff, and change nothing.")
@click.option(
    "--overwrite", is_flag=True, help="Also replace changes made to the rows after the ones reverted."
)
@click.option(
    "--skip-hidden",
    is_flag=True,
    help="Leave masked and excluded columns as they are (their values were never recorded).",
)
@actor_option
@dsn_option
@audit_schema_option
def revert(
    correlation_id: str | None,
    transaction_id: int | None,
    task_id: str | None,
    dry_run: bool,
    overwrite: bool,
    skip_hidden: bool,
    actor: ActorRef,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Undo what a request, a transaction or a task changed, in one transaction.

    Refuses (exit 1) when a row was changed again afterwards, naming it, unless --overwrite;
    and when restoring would need masked or excluded values, unless --skip-hidden. The revert
    is recorded under --actor and linked to a threadline.revert action.
    """
    if sum(v is not None for v in (correlation_id, transaction_id, task_id)) != 1:
        raise click.UsageError("name exactly one of --correlation-id, --transaction or --task")
    with connect(dsn) as conn, command_context("revert", actor):
        try:
            result = revert_changes(
                conn,
                correlation_id=correlation_id,
                transaction_id=transaction_id,
                task_id=task_id,
                dry_run=dry_run,
                overwrite=overwrite,
                skip_hidden=skip_hidden,
                audit_schema=audit_schema,
            )
        except RevertError as exc:
            fail(str(exc))
    echo(result.plan.render())
    if result.applied:
        echo(f"reverted {len(result.plan.steps)} row(s); recorded as action {result.action_id}")
    else:
        echo("dry run: nothing changed")
