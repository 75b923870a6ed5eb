"""``threadline export``: streams matching changes to a file or stdout, and resumes exactly where
the previous export stopped (``--after``, ``--cursor-file``); registered on
:data:`threadline.cli.cli`."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any, TextIO

import click

from threadline.cli.connect import dsn_option
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.reading import filter_options, reader
from threadline.core.actor import ActorRef
from threadline.explore.export import export as export_changes
from threadline.explore.export_rows import FORMATS

__all__ = ["export"]


@click.command(epilog=examples("export"))
@filter_options
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
    with reader(dsn, audit_schema) as conn:
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
            out = _OutputFile(output)
            try:
                count = export_changes(conn, out, fmt, **options)
                out.open()  # an empty export still makes (or empties) the file
            finally:
                out.close()
    where = "stdout" if output == "-" else output
    if count:
        click.echo(f"exported {count} change{'s' if count != 1 else ''} as {fmt} to {where}", err=True)
    else:
        click.echo(f"no changes match these filters; wrote an empty {fmt} export to {where}", err=True)
    if cursor_file is not None:
        _write_cursor_file(cursor_file, count.cursor)
    else:
        click.echo(f"resume: --after {count.cursor}", err=True)


class _OutputFile:
    """The ``--output`` file, opened (and emptied) at its first write: an export refused for a bad
    argument, which is refused before anything is written, leaves an existing file as it was."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = None

    def open(self) -> TextIO:
        """The file, opened for writing at the first call."""
        if self._file is None:
            try:
                self._file = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise click.UsageError(f"cannot write {self.path}: {exc.strerror}") from exc
        return self._file

    def write(self, text: str) -> int:
        """Write ``text``, opening the file first if need be."""
        return self.open().write(text)

    def close(self) -> None:
        """Close the file if it was opened."""
        if self._file is not None:
            self._file.close()


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
