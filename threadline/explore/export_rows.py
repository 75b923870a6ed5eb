"""What an export writes: the formats and their row layout (:data:`JSON_FIELDS`,
:data:`CSV_COLUMNS`), the statements that read the rows in order, and the writer that turns them
into CSV, JSON or NDJSON text. :func:`threadline.explore.export.export` runs them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format

from threadline.core.errors import InvalidFilter
from threadline.core.printable import spreadsheet_cell
from threadline.core.records import from_json, iso
from threadline.explore import paging
from threadline.explore.selection import Filters, changed_fields_sql, where_clause

FORMATS = ("csv", "json", "ndjson")
"""Supported export formats."""

EXPORT_VERSION = 1
"""Version of the exported row layout."""

JSON_FIELDS = (
    "id",
    "transaction_id",
    "captured_at",
    "table_schema",
    "table_name",
    "op",
    "pk",
    "changed_fields",
    "before",
    "after",
    "occurred_at",
    "actor",
    "correlation_id",
    "request_id",
    "causation_id",
    "origin",
    "job",
    "action_id",
)
"""Keys of every JSON/NDJSON row, in order."""

CSV_COLUMNS = (
    "id",
    "transaction_id",
    "captured_at",
    "table_schema",
    "table_name",
    "op",
    "pk",
    "changed_fields",
    "before",
    "after",
    "occurred_at",
    "actor_type",
    "actor_id",
    "correlation_id",
    "request_id",
    "causation_id",
    "origin",
    "job",
    "action_id",
)
"""The CSV header, in order."""

BATCH_SIZE = 10_000
"""Rows fetched from the server cursor per round trip."""


class _RawTimestamp(Loader):
    """Leaves a binary ``timestamptz`` as its bytes: only the last row's is ever read (the
    export's own timestamps are formatted as text by PostgreSQL)."""

    format = Format.BINARY

    def load(self, data: Buffer) -> bytes:
        """The value's 8 bytes, unconverted."""
        return bytes(data)


_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _timestamp(raw: bytes | datetime) -> datetime:
    """A binary ``timestamptz`` (microseconds since 2000-01-01 UTC) as a datetime (a position
    read from the row's own columns is one already)."""
    if isinstance(raw, datetime):
        return raw
    return _EPOCH + timedelta(microseconds=int.from_bytes(raw, "big", signed=True))


class ExportResult(int):
    """What :func:`export` returns: the number of changes written (it is that ``int``), and
    ``cursor``, from which a later export with ``after=`` writes every change committed since,
    exactly once, including those of transactions still running during this one."""

    cursor: str

    def __new__(cls, count: int, cursor: str) -> ExportResult:
        """``count`` changes written; ``cursor`` resumes after them."""
        self = super().__new__(cls, count)
        self.cursor = cursor
        return self


class TextSink(Protocol):
    """Anything with ``write(str)``: an open text file, ``sys.stdout``, ``io.StringIO``."""

    def write(self, text: str, /) -> Any:
        """Write ``text``."""


def _utc_text(expr: str) -> sql.SQL:
    return sql.SQL("to_char(" + expr + " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")


_SOURCES: dict[str, sql.SQL] = {
    "id": sql.SQL("c.id"),
    "transaction_id": sql.SQL("c.transaction_id"),
    "captured_at": _utc_text("c.captured_at"),
    "table_schema": sql.SQL("c.table_schema"),
    "table_name": sql.SQL("c.table_name"),
    "op": sql.SQL("c.op"),
    "pk": sql.SQL("c.pk"),
    "changed_fields": sql.SQL("to_jsonb({changed})"),
    "before": sql.SQL("c.before"),
    "after": sql.SQL("c.after"),
    "occurred_at": _utc_text("t.occurred_at"),
    "actor": sql.SQL("t.actor"),
    "actor_type": sql.SQL("t.actor ->> 'type'"),
    "actor_id": sql.SQL("t.actor ->> 'id'"),
    "correlation_id": sql.SQL("t.correlation_id"),
    "request_id": sql.SQL("t.request_id"),
    "causation_id": sql.SQL("t.causation_id"),
    "origin": sql.SQL("t.origin"),
    "job": sql.SQL("t.job"),
    "action_id": sql.SQL("t.action_id"),
}
_JSON_COLUMNS = {"pk", "changed_fields", "before", "after", "job"}


def _select_list(format: str, audit: sql.Identifier) -> sql.Composable:
    names = CSV_COLUMNS if format == "csv" else JSON_FIELDS
    changed = changed_fields_sql(audit)
    return sql.SQL(", ").join(
        sql.SQL("({})::text AS {}").format(_SOURCES[c].format(changed=changed), sql.Identifier(c))
        if format == "csv" and c in _JSON_COLUMNS
        else sql.SQL("{} AS {}").format(_SOURCES[c].format(changed=changed), sql.Identifier(c))
        for c in names
    )


def check_format(format: str) -> str:
    """One of :data:`FORMATS`."""
    if format not in FORMATS:
        raise InvalidFilter(f"format {format!r} is not one of {', '.join(FORMATS)}")
    return format


def _parts(format: str, audit: sql.Identifier) -> tuple[sql.Composable, tuple[str, ...], sql.Composable]:
    """The select list of ``format``, its column names, and the lateral join it reads from."""
    if format == "csv":
        return _select_list(format, audit), CSV_COLUMNS, sql.SQL("").format()
    # PostgreSQL writes each JSON object (keys in column order) and Python only moves text.
    lateral = sql.SQL(" CROSS JOIN LATERAL (SELECT {}) AS x").format(_select_list(format, audit))
    if format == "ndjson":
        # an image holds a json column's text as written, line breaks between its tokens included
        # (json refuses one inside a string): as spaces, each object keeps to its line
        return sql.SQL("translate(row_to_json(x)::text, E'\\n\\r', '  ') AS line"), ("line",), lateral
    return sql.SQL("row_to_json(x)::text AS line"), ("line",), lateral


def _statement(
    format: str,
    filters: Filters,
    limit: int | None,
    audit_schema: str,
    position: paging.Position,
    *,
    forward: bool = True,
) -> tuple[sql.Composed, dict[str, Any]]:
    """The page statement (late rows, rows in position order unless ``forward`` is false, the
    closing row)."""
    columns, names, lateral = _parts(format, sql.Identifier(audit_schema))
    params: dict[str, Any] = {}
    statement = paging.page_statement(
        sql.Identifier(audit_schema),
        columns,
        names,
        partial(where_clause, filters),
        position,
        limit,
        params,
        lateral,
        # without a limit only the last row's position is needed: it is read from its own columns
        forward_keys=limit is not None,
        forward=forward,
        tx_join=filters.tx_join,
    )
    return statement, params


def _forward_statement(
    format: str, filters: Filters, audit_schema: str, position: paging.Position
) -> tuple[sql.Composed, dict[str, Any]]:
    columns, _, lateral = _parts(format, sql.Identifier(audit_schema))
    params: dict[str, Any] = {}
    statement = paging.forward_statement(
        sql.Identifier(audit_schema),
        columns,
        partial(where_clause, filters),
        position,
        params,
        lateral,
        tx_join=filters.tx_join,
    )
    return statement, params


_SKIP = len(paging.KEY_COLUMNS)
_CSV_ID, _CSV_AT = _SKIP + CSV_COLUMNS.index("id"), _SKIP + CSV_COLUMNS.index("captured_at")


def _csv_key(row: tuple[Any, ...], skip: int = _SKIP) -> tuple[datetime, int]:
    return _parse_time(row[skip + _CSV_AT - _SKIP]), int(row[skip + _CSV_ID - _SKIP])


def _json_key(row: tuple[Any, ...], skip: int = _SKIP) -> tuple[datetime, int]:
    value = from_json(row[skip])  # an image may hold what json.loads refuses (see json_text)
    return _parse_time(value["captured_at"]), int(value["id"])


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def chunked_streaming() -> bool:
    """Whether the libpq in use can stream a result in chunks (libpq 17 and later)."""
    return psycopg.pq.version() >= 170000


class _Writer:
    """Writes rows of one format to ``out``."""

    def __init__(self, out: TextSink, format: str, filters: Filters, reader: paging.Reader) -> None:
        self.out = out
        self.format = format
        self.filters = filters
        self.reader = reader
        self.snapshot = paging.Snapshot(0, frozenset())
        self.count = 0
        self._csv = csv.writer(out, lineterminator="\n") if format == "csv" else None

    def page_rows(self, batch: list[tuple[Any, ...]]) -> None:
        """Write the rows of ``batch`` that belong to the export, without their key columns."""
        skip = len(paging.KEY_COLUMNS)
        if batch and batch[-1][0] == paging.CLOSING:  # the statement's last row
            self.snapshot = paging.parse_snapshot(batch[-1][5])
            batch = batch[:-1]
        if self.reader.limit is None:  # every row belongs to the export
            self.reader.take_all(batch, _csv_key if self.format == "csv" else _json_key)
            self.rows([row[skip:] for row in batch])
            return
        take = self.reader.take
        self.rows([row[skip:] for row in batch if take(row[0], row[1], row[2], row[3], row[4])])

    def forward_rows(self, batch: list[tuple[Any, ...]]) -> None:
        """Write rows of :func:`paging.forward_statement` (no key columns), remembering the last."""
        if batch:
            key = _csv_key if self.format == "csv" else _json_key
            self.reader.take_forward(len(batch), key(batch[-1], 0))
        self.rows(batch)

    def result(self) -> ExportResult:
        """How many changes were written, and the cursor a later export resumes from."""
        position, _ = self.reader.close(self.snapshot)
        return ExportResult(self.count, paging.encode(position, self.filters.fingerprint()))

    def start(self) -> None:
        if self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)
        elif self.format == "json":
            head = {
                "format": "threadline.changes",
                "version": EXPORT_VERSION,
                "exported_at": iso(datetime.now(timezone.utc)),
                "filters": self.filters.to_dict(),
            }
            self.out.write(json.dumps(head)[:-1] + ', "changes": [\n')

    def rows(self, batch: Iterable[tuple[Any, ...]]) -> None:
        if self._csv is not None:
            rows = [tuple(spreadsheet_cell(v) for v in row) for row in batch]
            self._csv.writerows(rows)
            self.count += len(rows)
        elif self.format == "ndjson":
            lines = [r[0] for r in batch]
            if lines:
                self.out.write("\n".join(lines) + "\n")
            self.count += len(lines)
        else:
            lines = [r[0] for r in batch]
            if lines:
                self.out.write((",\n" if self.count else "") + ",\n".join(lines))
            self.count += len(lines)

    def finish(self) -> None:
        if self.format == "json":
            self.out.write(("\n" if self.count else "") + "]}\n")
