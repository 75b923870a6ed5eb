"""Streaming exports: NDJSON, JSON and CSV, with the timeline's filters and order."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import timezone
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ThreadlineConnection
from threadline.core.errors import InvalidFilter, TableNotFound
from threadline.explore.export_rows import CSV_COLUMNS, EXPORT_VERSION, JSON_FIELDS, chunked_streaming

from .story import Story
from .test_cli import run

Conn = psycopg.Connection[Any]


def _ndjson(conn: Conn, **filters: Any) -> list[dict[str, Any]]:
    out = io.StringIO()
    count = threadline.export(conn, out, "ndjson", **filters)
    if chunked_streaming():  # the other path gives the same answer
        other = io.StringIO()
        assert threadline.export(conn, other, "ndjson", server_cursor=True, **filters) == count
        assert other.getvalue() == out.getvalue()
    lines = out.getvalue().splitlines()
    assert count == len(lines)
    return [json.loads(line) for line in lines]


def test_ndjson_rows_match_the_timeline(conn: Conn, story: Story) -> None:
    rows = _ndjson(conn)
    timeline = list(threadline.timeline(conn, limit=1000))
    assert [r["id"] for r in rows] == [c.id for c in timeline]
    for row, change in zip(rows, timeline, strict=True):
        assert tuple(row) == JSON_FIELDS
        assert row["captured_at"] == change.captured_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert (row["pk"], row["after"], row["before"]) == (change.pk, change.after, change.before)
        assert row["changed_fields"] == (
            None if change.changed_fields is None else list(change.changed_fields)
        )
        tx = change.transaction
        assert tx is not None
        assert row["occurred_at"] == tx.occurred_at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert row["actor"] == (None if tx.actor is None else tx.actor.to_dict())
        assert (row["correlation_id"], row["job"], row["action_id"]) == (
            tx.correlation_id,
            tx.job,
            tx.action_id,
        )
    assert rows[0]["table_schema"] == "app" and rows[0]["op"] == "insert"


def test_exports_take_the_timeline_filters(conn: Conn, story: Story) -> None:
    assert len(_ndjson(conn, correlation_id="req-1")) == 9
    assert {r["table_name"] for r in _ndjson(conn, table="app.line_items")} == {"line_items"}
    assert [r["correlation_id"] for r in _ndjson(conn, actor="user:7")] == ["req-2"]
    assert [r["op"] for r in _ndjson(conn, op="delete")] == ["delete"]
    assert len(_ndjson(conn, correlation_id="req-1", limit=4)) == 4
    middle = list(threadline.timeline(conn))[5].captured_at
    assert len(_ndjson(conn, since=middle)) == 5 and len(_ndjson(conn, until=middle)) == 5
    assert _ndjson(conn, correlation_id="nope") == []


def test_csv_cells_a_spreadsheet_would_run_are_quoted(conn: Conn, story: Story, dsn: str) -> None:
    with (
        threadline.context(actor="user:=1+1", correlation_id='=HYPERLINK("http://x.example","y")'),
        threadline.transaction(conn),
    ):
        conn.execute("INSERT INTO app.comments (id, post_id, body) VALUES (90, 1, '@SUM(A1)')")
    out = io.StringIO()
    threadline.export(conn, out, "csv", correlation_id='=HYPERLINK("http://x.example","y")')
    (row,) = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert row["actor_id"] == "'=1+1" and row["correlation_id"] == '\'=HYPERLINK("http://x.example","y")'
    assert json.loads(row["after"])["body"] == "@SUM(A1)"  # inside JSON text: not a cell of its own
    (line,) = _ndjson(conn, correlation_id='=HYPERLINK("http://x.example","y")')
    assert line["actor"]["id"] == "=1+1"  # the JSON formats keep the text as it is
    threadline.take_baseline(conn, "app.comments")
    res = run("as-of", "app.comments", "--at", "now", "--format", "csv", "--dsn", dsn)
    assert res.returncode == 0 and "'@SUM(A1)" in res.stdout, res.stdout + res.stderr


def test_json_document_wraps_rows_with_a_version(conn: Conn, story: Story) -> None:
    out = io.StringIO()
    assert threadline.export(conn, out, "json", correlation_id="req-1") == 9
    doc = json.loads(out.getvalue())
    assert doc["format"] == "threadline.changes" and doc["version"] == EXPORT_VERSION
    assert doc["filters"]["correlation_id"] == "req-1" and doc["exported_at"].endswith("Z")
    assert doc["changes"] == _ndjson(conn, correlation_id="req-1")
    empty = io.StringIO()
    assert threadline.export(conn, empty, "json", correlation_id="nope") == 0
    assert json.loads(empty.getvalue())["changes"] == []


def test_csv_has_the_documented_columns(conn: Conn, story: Story) -> None:
    out = io.StringIO()
    assert threadline.export(conn, out, "csv") == 10
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    reference = _ndjson(conn)
    for row, ref in zip(rows, reference, strict=True):
        assert int(row["id"]) == ref["id"] and row["captured_at"] == ref["captured_at"]
        assert json.loads(row["pk"]) == ref["pk"]
        assert (json.loads(row["after"]) if row["after"] else None) == ref["after"]
        assert (json.loads(row["changed_fields"]) if row["changed_fields"] else None) == ref["changed_fields"]
        assert row["actor_type"] == ref["actor"]["type"] and row["actor_id"] == ref["actor"]["id"]
    other = io.StringIO()
    threadline.export(conn, other, "csv", server_cursor=True)
    assert other.getvalue() == out.getvalue()
    empty = io.StringIO()
    assert threadline.export(conn, empty, "csv", correlation_id="nope") == 0
    assert empty.getvalue().strip() == ",".join(CSV_COLUMNS)


def test_export_on_an_automatic_mode_connection(story: Story) -> None:
    with ThreadlineConnection.connect(story.dsn, autocommit=True) as auto, threadline.context(actor="user:1"):
        out = io.StringIO()
        assert threadline.export(auto, out, "ndjson", correlation_id="req-1") == 9
    with ThreadlineConnection.connect(story.dsn) as auto, threadline.context(actor="user:1"):
        out = io.StringIO()
        assert threadline.export(auto, out, "ndjson", correlation_id="req-1", server_cursor=True) == 9


class Sink:
    """Counts writes: rows arrive batch by batch, never all at once."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


@pytest.mark.parametrize("server_cursor", [False, True], ids=["chunked", "server-cursor"])
def test_export_streams_in_batches(conn: Conn, posts: str, server_cursor: bool) -> None:
    if not server_cursor and not chunked_streaming():
        pytest.skip("libpq older than 17: exports use the server-side cursor")
    conn.execute("INSERT INTO app.posts (id, title) SELECT g, 'p' || g FROM generate_series(1, 25) g")
    sink = Sink()
    assert threadline.export(conn, sink, "ndjson", batch_size=4, server_cursor=server_cursor) == 25
    assert len(sink.writes) == 7  # ceil(25 / 4) batches, each written as it arrived
    assert all(w.count("\n") <= 4 for w in sink.writes)
    assert [json.loads(x)["pk"]["id"] for w in sink.writes for x in w.splitlines()] == list(range(1, 26))
    assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone() == (0,)  # closed again


class Broken(Sink):
    """A reader that goes away after the first batch."""

    def write(self, text: str) -> int:
        if self.writes:
            raise BrokenPipeError
        return super().write(text)


@pytest.mark.parametrize("server_cursor", [False, True], ids=["chunked", "server-cursor"])
def test_an_interrupted_export_leaves_the_connection_usable(
    conn: Conn, posts: str, server_cursor: bool
) -> None:
    if not server_cursor and not chunked_streaming():
        pytest.skip("libpq older than 17: exports use the server-side cursor")
    conn.execute("INSERT INTO app.posts (id) SELECT g FROM generate_series(1, 50) g")
    with pytest.raises(BrokenPipeError):
        threadline.export(conn, Broken(), "ndjson", batch_size=5, server_cursor=server_cursor)
    assert conn.execute("SELECT count(*) FROM app.posts").fetchone() == (50,)
    assert len(_ndjson(conn)) == 50


def test_export_inside_an_open_transaction(conn: Conn, posts: str) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        out = io.StringIO()
        assert threadline.export(conn, out, "ndjson") == 1  # sees its own transaction's writes
        conn.execute("INSERT INTO app.posts (id) VALUES (2)")
    assert len(_ndjson(conn)) == 2


def test_bad_export_arguments(conn: Conn, story: Story) -> None:
    for kwargs in (
        {"format": "xml"},
        {"limit": 0},
        {"batch_size": 0},
        {"audit_schema": "Bad Name"},
        {"op": "x"},
    ):
        with pytest.raises(InvalidFilter):
            threadline.export(conn, io.StringIO(), **kwargs)
    with pytest.raises(TableNotFound):
        threadline.export(conn, io.StringIO(), table="app.nope")


@pytest.mark.parametrize("server_cursor", [None, True], ids=["default", "server-cursor"])
def test_export_async(story: Story, conn: Conn, server_cursor: bool | None) -> None:
    async def main() -> str:
        out = io.StringIO()
        async with await psycopg.AsyncConnection.connect(story.dsn, autocommit=True) as aconn:
            count = await threadline.export_async(
                aconn, out, "ndjson", correlation_id="req-1", batch_size=2, server_cursor=server_cursor
            )
            assert count == 9
        return out.getvalue()

    lines = asyncio.run(main()).splitlines()
    assert [json.loads(x) for x in lines] == _ndjson(conn, correlation_id="req-1")
