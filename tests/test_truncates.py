"""Each captured TRUNCATE has an entry in ``truncates``, by table and time, that ``as_of`` and
``revert`` find it through; ``changes`` has no partial index any more."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ddl
from threadline.explore.as_of_query import RowDeleted
from threadline.ops import retention

from .conftest import age_audit_rows, changes, transactions

Conn = psycopg.Connection[Any]


def _entries(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT table_schema, table_name, change_id, transaction_id, captured_at FROM threadline.truncates"
        " ORDER BY change_id"
    ).fetchall()


def _truncate_changes(conn: Conn) -> list[dict[str, Any]]:
    return [c for c in changes(conn) if c["op"] == "truncate"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def test_a_truncate_is_recorded_with_an_entry_beside_its_change(conn: Conn, posts: str) -> None:
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    with threadline.context(actor="user:7", correlation_id="req-t"), threadline.transaction(conn):
        conn.execute("UPDATE app.posts SET title = 'b'")
        conn.execute("TRUNCATE app.posts")
    (change,) = _truncate_changes(conn)
    assert (change["actor"], change["correlation_id"]) == ({"type": "user", "id": "7"}, "req-t")
    assert _entries(conn) == [("app", "posts", change["id"], change["transaction_id"], change["captured_at"])]
    # its transaction's start time, which a partitioned store joins the entry to its change by
    started = conn.execute("SELECT occurred_at FROM threadline.truncates").fetchone()
    assert (
        started
        == conn.execute(
            "SELECT occurred_at FROM threadline.transactions WHERE id = %s", [change["transaction_id"]]
        ).fetchone()
    )
    # no index of changes has a predicate that every captured statement would prepare
    partial = conn.execute(
        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = 'threadline.changes'::regclass AND i.indpred IS NOT NULL"
    ).fetchone()
    assert partial == (0,)
    # a statement that is not a truncate writes no entry
    conn.execute("INSERT INTO app.posts (id, title) VALUES (2, 'c')")
    conn.execute("DELETE FROM app.posts")
    assert len(_entries(conn)) == 1


def test_a_truncate_in_a_second_row_of_its_transaction_moves_with_its_change(conn: Conn, posts: str) -> None:
    # a session that clears the marker makes its next statement write a second transaction row;
    # at commit the second row's changes move to the first, and the truncate's entry with them
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    before = _now()
    with threadline.context(actor="user:8"), threadline.transaction(conn):
        conn.execute("UPDATE app.posts SET title = 'b'")
        conn.execute("RESET threadline.txctx_threadline")
        conn.execute("TRUNCATE app.posts")
    rows = transactions(conn)
    assert len(rows) == 2  # the first insert's, and this transaction's one row
    (change,) = _truncate_changes(conn)
    assert change["transaction_id"] == rows[1]["id"]
    assert [e[2:4] for e in _entries(conn)] == [(change["id"], rows[1]["id"])]
    assert threadline.as_of(conn, "app.posts", 1, before)["title"] == "a"
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.posts", 1, _now())


def test_revert_finds_a_later_truncate_through_its_entry(conn: Conn, posts: str) -> None:
    with threadline.context(correlation_id="req-r"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    conn.execute("TRUNCATE app.posts")
    with pytest.raises(threadline.RevertError, match=r"app\.posts \(id=1\): its table was truncated at"):
        threadline.revert(conn, correlation_id="req-r")


def test_purge_forgets_the_entries_of_the_truncates_it_purged(conn: Conn, posts: str) -> None:
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    conn.execute("TRUNCATE app.posts")
    (old,) = _entries(conn)
    age_audit_rows(conn, "100 days")
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'b')")
    conn.execute("TRUNCATE app.posts")
    result = retention.purge(conn, timedelta(days=30))
    assert result.changes == 2
    (kept,) = _entries(conn)
    assert kept[2] != old[2]
    (change,) = _truncate_changes(conn)
    assert kept[2:4] == (change["id"], change["transaction_id"])
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.posts", 1, _now())


def test_install_fills_truncates_from_the_changes_of_an_earlier_build(conn: Conn, posts: str) -> None:
    # an earlier build of this version found truncates through a partial index of changes and had
    # no truncates table (and its script left no comment naming it)
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    before = _now()
    conn.execute("TRUNCATE app.posts")
    (change,) = _truncate_changes(conn)
    conn.execute("DROP TABLE threadline.truncates")
    conn.execute(
        "CREATE INDEX changes_truncate_idx ON threadline.changes (table_schema, table_name, captured_at)"
        " WHERE op = 'truncate'"
    )
    conn.execute("COMMENT ON TABLE threadline.schema_version IS NULL")
    result = ddl.install(conn)
    assert result.previous_version == result.version == ddl.SCHEMA_VERSION
    assert _entries(conn) == [("app", "posts", change["id"], change["transaction_id"], change["captured_at"])]
    assert conn.execute("SELECT to_regclass('threadline.changes_truncate_idx')").fetchone() == (None,)
    assert threadline.as_of(conn, "app.posts", 1, before)["title"] == "a"
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.posts", 1, _now())
    # the capture code was regenerated: a new truncate writes its entry
    conn.execute("TRUNCATE app.posts")
    assert len(_entries(conn)) == 2
    assert not ddl.install(conn).changed  # and a second install has nothing left to do


def test_a_rolled_back_truncate_leaves_no_entry_and_a_hostile_name_is_kept_as_written(conn: Conn) -> None:
    conn.execute('CREATE TABLE app."Or""ders; --" (id int PRIMARY KEY, v text)')
    ddl.track(conn, 'app."Or""ders; --"')
    conn.execute('INSERT INTO app."Or""ders; --" VALUES (1, \'a\')')
    with conn.transaction():
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute('TRUNCATE app."Or""ders; --"')
            conn.execute("SELECT 1 / 0")
        conn.execute('UPDATE app."Or""ders; --" SET v = \'b\'')
    assert _entries(conn) == []  # the savepoint that truncated rolled back, its entry with it
    assert threadline.as_of(conn, 'app."Or""ders; --"', 1, _now())["v"] == "b"
    conn.execute('TRUNCATE app."Or""ders; --"')
    (entry,) = _entries(conn)
    assert entry[:2] == ("app", 'Or"ders; --')
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, 'app."Or""ders; --"', 1, _now())
