"""``threadline timeline``, ``history``, ``trace``, ``export`` and ``actions``: the commands that read
the audit trail, registered on :data:`threadline.cli.cli`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click
import psycopg

from threadline.cli.connect import F, connect, dsn_option, parse_key, when_option_value
from threadline.cli.help import audit_schema_option, examples
from threadline.core.actor import ActorRef
from threadline.core.errors import InvalidActor, QueryError, SchemaError
from threadline.core.records import OPS, Change
from threadline.ddl import schema as ddl_schema
from threadline.explore import query, timeline_query
from threadline.explore.actions import list_actions
from threadline.explore.arguments import MAX_LIMIT
from threadline.explore.as_of_query import AsOfError
from threadline.explore.as_of_query import as_of as row_as_of
from threadline.explore.diff import diff
from threadline.explore.export import export as export_changes
from threadline.explore.export_rows import FORMATS
from threadline.explore.tracing import format_key


def _actor(ctx: click.Context, param: click.Parameter, value: str | None) -> ActorRef | None:
    if value is None:
        return None
    try:
        return ActorRef.parse(value)
    except InvalidActor as exc:
        raise click.BadParameter(exc.problem) from exc


def _filter_options(func: F) -> F:
    for option in reversed(
        [
            click.option("--correlation-id", metavar="ID", help="Only changes of this correlation id."),
            click.option("--table", metavar="[SCHEMA.]TABLE", help="Only changes of this table."),
            click.option(
                "--actor", metavar="TYPE:ID", callback=_actor, help="Only changes by this actor (user:42)."
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
def _reader(dsn: str | None, audit_schema: str) -> Iterator[psycopg.Connection[Any]]:
    try:
        ddl_schema.install_sql(audit_schema)
    except SchemaError as exc:
        raise click.UsageError(str(exc)) from exc
    with connect(dsn) as conn, _query_errors():
        ddl_schema.require_installed(conn, audit_schema)
        yield conn


def _time(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _value(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _aligned(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _change_row(change: Change) -> tuple[str, ...]:
    tx = change.transaction
    fields = ", ".join(change.changed_fields or ()) if change.op == "update" else ""
    return (
        _time(change.captured_at),
        change.op,
        change.table,
        _value(format_key(change.pk), 40),
        "" if tx is None or tx.actor is None else str(tx.actor),
        "" if tx is None else tx.origin or "",
        "" if tx is None else _value(tx.correlation_id or "", 36),
        str(change.transaction_id),
        _value(fields, 50),
    )


_CHANGE_HEADERS = ("CAPTURED (UTC)", "OP", "TABLE", "KEY", "ACTOR", "ORIGIN", "CORRELATION", "TX", "CHANGED")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


@click.command(epilog=examples("timeline"))
@_filter_options
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=100, show_default=True, help="Page size.")
@click.option("--after", metavar="CURSOR", help="Continue after the page that printed this cursor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dsn_option
@audit_schema_option
def timeline(
    correlation_id: str | None,
    table: str | None,
    actor: ActorRef | None,
    op: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    after: str | None,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Changes in capture order with who, where and which request (one page)."""
    with _reader(dsn, audit_schema) as conn:
        page = timeline_query.timeline(
            conn,
            correlation_id=correlation_id,
            table=table,
            actor=actor,
            op=op,
            since=since,
            until=until,
            limit=limit,
            after=after,
            audit_schema=audit_schema,
        )
    if as_json:
        _echo_json(
            {"changes": [c.to_dict() for c in page], "next_cursor": page.next_cursor, "cursor": page.cursor}
        )
        return
    if not page:
        click.echo("no changes match these filters")
        return
    click.echo(_aligned(_CHANGE_HEADERS, [_change_row(c) for c in page]))
    if page.next_cursor:
        click.echo(f"\nmore: add --after {page.next_cursor}")


def _history_lines(change: Change) -> list[str]:
    tx = change.transaction
    head = "  ".join(
        p
        for p in (
            _time(change.captured_at),
            change.op,
            f"tx {change.transaction_id}",
            None if tx is None or tx.actor is None else str(tx.actor),
            None if tx is None else tx.origin,
            None if tx is None or tx.correlation_id is None else f"correlation {tx.correlation_id}",
        )
        if p
    )
    lines = [head]
    for item in diff(change):
        if change.op == "update":
            lines.append(f"    {item.field}: {_value(item.before)} → {_value(item.after)}")
        else:
            lines.append(f"    {item.field}: {_value(item.before if change.op == 'delete' else item.after)}")
    return lines


@click.command(epilog=examples("history"))
@click.argument("table", metavar="[SCHEMA.]TABLE")
@click.argument("pk", metavar="PK")
@click.option(
    "--as-of",
    "as_of",
    metavar="WHEN",
    callback=when_option_value,
    help="Show the row as it was then instead.",
)
@click.option("--limit", type=click.IntRange(1), help="Only the newest N changes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@dsn_option
@audit_schema_option
def history(
    table: str,
    pk: str,
    as_of: datetime | None,
    limit: int | None,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Every change of one row, newest first (PK: 7, col=1,col=2 or JSON)."""
    key = parse_key(pk)
    with _reader(dsn, audit_schema) as conn:
        if as_of is not None:
            try:
                row = row_as_of(conn, table, key, as_of, audit_schema=audit_schema)
            except AsOfError as exc:
                if as_json:
                    _echo_json({"row": None, "reason": str(exc)})
                else:
                    click.echo(str(exc))
                return
            if as_json:
                _echo_json({"row": row})
            else:
                width = max((len(k) for k in row), default=0)
                click.echo("\n".join(f"{k.ljust(width)}  {_value(v, 100)}" for k, v in row.items()))
            return
        changes = query.history(conn, table, key, limit=limit, audit_schema=audit_schema)
    if as_json:
        _echo_json([c.to_dict() for c in changes])
        return
    if not changes:
        click.echo(f"no captured changes for {table} {pk}")
        return
    click.echo("\n".join(line for c in changes for line in _history_lines(c)))


@click.command(epilog=examples("trace"))
@click.argument("correlation_id", metavar="CORRELATION_ID")
@click.option(
    "--max-changes",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="Changes listed per transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@dsn_option
@audit_schema_option
def trace(correlation_id: str, max_changes: int, as_json: bool, dsn: str | None, audit_schema: str) -> None:
    """The story of one request: request → tasks → transactions → changes."""
    with _reader(dsn, audit_schema) as conn:
        found = query.trace(conn, correlation_id, audit_schema=audit_schema)
    if as_json:
        _echo_json(found.to_dict())
    elif found.empty:
        click.echo(f"nothing recorded for correlation id {correlation_id}")
    else:
        click.echo(found.render(max_changes=max_changes), nl=False)


@click.command(epilog=examples("export"))
@_filter_options
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True)
@click.option(
    "--output", "-o", metavar="PATH", default="-", show_default=True, help="File to write ('-': stdout)."
)
@click.option("--limit", type=click.IntRange(1), help="At most N changes.")
@click.option(
    "--after", metavar="CURSOR", help="Only changes committed since the export that printed this cursor."
)
@click.option(
    "--cursor-file",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Resume from the cursor in PATH (if it exists) and save the new one there after a successful export.",
)
@dsn_option
@audit_schema_option
def export(
    correlation_id: str | None,
    table: str | None,
    actor: ActorRef | None,
    op: str | None,
    since: datetime | None,
    until: datetime | None,
    fmt: str,
    output: str,
    limit: int | None,
    after: str | None,
    cursor_file: str | None,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Stream matching changes as CSV, JSON or NDJSON (flat memory, any size).

    Run again with the printed cursor (``--after``), or keep it in a file (``--cursor-file``), and
    each run writes exactly the changes committed since the previous one, including those of
    transactions that were still running then.
    """
    if after is not None and cursor_file is not None:
        raise click.UsageError("give either --after or --cursor-file, not both")
    if cursor_file is not None:
        after = _read_cursor_file(cursor_file)
    with _reader(dsn, audit_schema) as conn:
        options: dict[str, Any] = {
            "correlation_id": correlation_id,
            "table": table,
            "actor": actor,
            "op": op,
            "since": since,
            "until": until,
            "limit": limit,
            "audit_schema": audit_schema,
            "after": after,
        }
        if output == "-":
            try:
                count = export_changes(conn, sys.stdout, fmt, **options)
                sys.stdout.flush()
            except BrokenPipeError:
                # the reader went away (`| head`): stop quietly, as other command-line tools do
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
        else:
            try:
                out = open(output, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise click.UsageError(f"cannot write {output}: {exc.strerror}") from exc
            with out:
                count = export_changes(conn, out, fmt, **options)
    where = "stdout" if output == "-" else output
    if count:
        click.echo(f"exported {count} change{'s' if count != 1 else ''} as {fmt} to {where}", err=True)
    else:
        click.echo(f"no changes match these filters; wrote an empty {fmt} export to {where}", err=True)
    if cursor_file is not None:
        _write_cursor_file(cursor_file, count.cursor)
    else:
        click.echo(f"resume: --after {count.cursor}", err=True)


def _read_cursor_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return text or None


def _write_cursor_file(path: str, cursor: str) -> None:
    """Replace the cursor file in one step, so an interrupted run leaves the previous cursor."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(cursor + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise click.UsageError(f"cannot write {path}: {exc.strerror}") from exc


@click.command(epilog=examples("actions"))
@click.option("--correlation-id", metavar="ID", help="Only actions of this correlation id.")
@click.option("--actor", metavar="TYPE:ID", callback=_actor, help="Only actions by this actor.")
@click.option("--name", metavar="NAME", help="Only actions with this name.")
@click.option(
    "--since", metavar="WHEN", callback=when_option_value, help="Recorded at or after (2h, ISO time)."
)
@click.option("--until", metavar="WHEN", callback=when_option_value, help="Recorded before (2h, ISO time).")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@dsn_option
@audit_schema_option
def actions(
    correlation_id: str | None,
    actor: ActorRef | None,
    name: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Recorded actions (who did what and why), oldest first."""
    with _reader(dsn, audit_schema) as conn:
        found = list_actions(
            conn,
            correlation_id=correlation_id,
            actor=actor,
            name=name,
            since=since,
            until=until,
            limit=limit,
            audit_schema=audit_schema,
        )
    if as_json:
        _echo_json([a.to_dict() for a in found])
        return
    if not found:
        click.echo("no actions match these filters")
        return
    rows = [
        (
            _time(a.inserted_at),
            a.name,
            a.status,
            "" if a.actor is None else str(a.actor),
            _value(a.correlation_id or "", 36),
            _value(a.reason or "", 50),
        )
        for a in found
    ]
    click.echo(_aligned(("RECORDED (UTC)", "NAME", "STATUS", "ACTOR", "CORRELATION", "REASON"), rows))
