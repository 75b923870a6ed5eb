"""``threadline timeline``, ``history``, ``trace`` and ``actions``: the commands that show the audit
trail in the terminal (as aligned text or JSON), registered on :data:`threadline.cli.cli`."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import click

from threadline.cli.connect import dsn_option, parse_key, when_option_value
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.output import echo
from threadline.cli.reading import actor_value, filter_options, reader
from threadline.core.actor import ActorRef
from threadline.core.json_text import dumps_exact
from threadline.core.printable import one_line
from threadline.core.records import Change
from threadline.explore import query, timeline_query
from threadline.explore.actions import list_actions
from threadline.explore.arguments import MAX_LIMIT
from threadline.explore.as_of_query import AsOfError
from threadline.explore.as_of_query import as_of as row_as_of
from threadline.explore.diff import diff
from threadline.explore.tracing import Trace, format_key

__all__ = ["actions", "history", "timeline", "trace"]


def _time(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _value(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else dumps_exact(value, ensure_ascii=False, default=str)
    text = one_line(text)
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
        one_line(change.table),
        _value(format_key(change.pk), 40),
        "" if tx is None or tx.actor is None else one_line(str(tx.actor)),
        "" if tx is None else one_line(tx.origin or ""),
        "" if tx is None else _value(tx.correlation_id or "", 36),
        str(change.transaction_id),
        _value(fields, 50),
    )


_CHANGE_HEADERS = ("CAPTURED (UTC)", "OP", "TABLE", "KEY", "ACTOR", "ORIGIN", "CORRELATION", "TX", "CHANGED")


def _echo_json(value: Any) -> None:
    echo(dumps_exact(value, ensure_ascii=False, indent=2))


@click.command(epilog=examples("timeline"))
@filter_options
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
    with reader(dsn, audit_schema) as conn:
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
        echo("no changes match these filters")
        return
    echo(_aligned(_CHANGE_HEADERS, [_change_row(c) for c in page]))
    if page.next_cursor:
        echo(f"\nmore: add --after {page.next_cursor}")


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
    lines = [one_line(head)]
    for item in diff(change):
        field = one_line(item.field)
        if change.op == "update":
            lines.append(f"    {field}: {_value(item.before)} → {_value(item.after)}")
        else:
            lines.append(f"    {field}: {_value(item.before if change.op == 'delete' else item.after)}")
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
    with reader(dsn, audit_schema) as conn:
        if as_of is not None:
            try:
                row = row_as_of(conn, table, key, as_of, audit_schema=audit_schema)
            except AsOfError as exc:
                if as_json:
                    _echo_json({"row": None, "reason": str(exc)})
                else:
                    echo(str(exc))
                return
            if as_json:
                _echo_json({"row": row})
            else:
                width = max((len(k) for k in row), default=0)
                echo("\n".join(f"{k.ljust(width)}  {_value(v, 100)}" for k, v in row.items()))
            return
        changes = query.history(conn, table, key, limit=limit, audit_schema=audit_schema)
    if as_json:
        _echo_json([c.to_dict() for c in changes])
        return
    if not changes:
        echo(f"no captured changes for {table} {pk}")
        return
    echo("\n".join(line for c in changes for line in _history_lines(c)))


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
    with reader(dsn, audit_schema) as conn:
        found = query.trace(conn, correlation_id, audit_schema=audit_schema)
    if as_json:
        with _nesting(_depth(found)):
            _echo_json(found.to_dict())
    elif found.empty:
        echo(f"nothing recorded for correlation id {correlation_id}")
    else:
        echo(found.render(max_changes=max_changes), nl=False)


def _depth(found: Trace) -> int:
    """How many nodes deep the trace's tree is (a chain of tasks is as deep as it is long)."""
    deepest = 0
    stack = [(root, 1) for root in found.roots]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node.children)
    return deepest


@contextmanager
def _nesting(depth: int) -> Iterator[None]:
    """Room for JSON ``depth`` trace nodes deep: ``json`` writes (and :func:`dumps_exact` reads)
    each nested value by recursion, a few calls per node."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 8 * depth)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@click.command(epilog=examples("actions"))
@click.option("--correlation-id", metavar="ID", help="Only actions of this correlation id.")
@click.option("--actor", metavar="TYPE:ID", callback=actor_value, help="Only actions by this actor.")
@click.option("--name", metavar="NAME", help="Only actions with this name.")
@click.option(
    "--since", metavar="WHEN", callback=when_option_value, help="Recorded at or after (2h, ISO time)."
)
@click.option("--until", metavar="WHEN", callback=when_option_value, help="Recorded before (2h, ISO time).")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=100, show_default=True)
@click.option(
    "--after",
    type=click.IntRange(1, 2**63 - 1),
    metavar="ID",
    help="Start after the action of this id (the last one of the previous page).",
)
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
    after: int | None,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """Recorded actions (who did what and why), oldest first."""
    with reader(dsn, audit_schema) as conn:
        found = list_actions(
            conn,
            correlation_id=correlation_id,
            actor=actor,
            name=name,
            since=since,
            until=until,
            limit=min(limit + 1, MAX_LIMIT),  # one more: to tell whether the list was cut
            audit_schema=audit_schema,
            after=after,
        )
    cut = len(found) > limit or len(found) == MAX_LIMIT
    found = found[:limit]
    if as_json:
        _echo_json([a.to_dict() for a in found])
    elif not found:
        echo("no actions match these filters")
    else:
        _echo_actions(found)
    if cut and found:  # oldest first: the newest are the ones left out
        echo(
            f"more actions match (the first {limit} shown, oldest first): next page with"
            f" --after {found[-1].id}, or narrow the filters",
            err=True,
        )


def _echo_actions(found: Sequence[Any]) -> None:
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
    echo(_aligned(("RECORDED (UTC)", "NAME", "STATUS", "ACTOR", "CORRELATION", "REASON"), rows))
