"""Erasure of one row's values (``erase(row=...)``) on the real database: the row's whole history,
also under the keys it had before, and column policies checked against its columns."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import threadline
from threadline.core.errors import InvalidFilter
from threadline.ops.erasure import TOMBSTONE, erase

from .test_cli import run


@pytest.fixture
def people(conn: psycopg.Connection[Any]) -> str:
    conn.execute("CREATE TABLE app.people (id int PRIMARY KEY, email text, age int)")
    threadline.ddl.track(conn, "app.people")
    return "app.people"


def _write(conn: psycopg.Connection[Any], statement: str) -> None:
    with threadline.context(actor="user:1"), threadline.transaction(conn):
        conn.execute(statement)


def _images(conn: psycopg.Connection[Any]) -> str:
    rows = conn.execute("SELECT pk::text, after::text, before::text FROM threadline.changes ORDER BY id")
    return repr(rows.fetchall())


def test_a_row_is_erased_under_the_keys_it_had_before(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, "INSERT INTO app.people VALUES (42, 'alice@example.com', 30)")
    _write(conn, "UPDATE app.people SET age = 31 WHERE id = 42")
    _write(conn, "UPDATE app.people SET id = 43 WHERE id = 42")
    _write(conn, "UPDATE app.people SET id = 44, email = 'alice@example.org' WHERE id = 43")
    # key 42 then goes to someone else, whose values stay
    _write(conn, "INSERT INTO app.people VALUES (42, 'bob@example.com', 50)")
    dry = erase(conn, row=(people, 44), reason="request 7", dry_run=True)
    assert (dry.changes, dry.transactions, dry.applied) == (4, 4, False)
    result = erase(conn, row=(people, 44), reason="request 7")
    assert (result.changes, result.transactions) == (4, 4)
    text = _images(conn)
    assert "alice" not in text and "31" not in text, text
    assert "bob@example.com" in text and "50" in text
    # erasing again rewrites nothing, and says so
    assert erase(conn, row=(people, 44), reason="request 7").changes == 0


def test_column_policies_name_real_columns(conn: psycopg.Connection[Any], people: str, dsn: str) -> None:
    _write(conn, "INSERT INTO app.people VALUES (5, 'five@example.com', 55)")
    with pytest.raises(InvalidFilter, match=r"column\(s\) emial not found in app.people"):
        erase(conn, row=(people, 5), policy="keep", columns={"emial": "erase"}, reason="r")
    with pytest.raises(InvalidFilter, match="key column"):
        erase(conn, row=(people, 5), policy="keep", columns={"id": "erase"}, reason="r")
    assert "five@example.com" in _images(conn)
    res = run(
        "erase",
        "--row",
        people,
        "5",
        "--policy",
        "keep",
        "--column",
        "emial=erase",
        "--reason",
        "r",
        "--dsn",
        dsn,
    )
    assert res.returncode == 2 and "emial not found" in res.stderr, res.stdout + res.stderr
    # a column the table has lost since is still known from the row's images
    conn.execute("ALTER TABLE app.people DROP COLUMN age")
    result = erase(conn, row=(people, 5), policy="keep", columns={"age": "erase"}, reason="r")
    assert result.changes == 1 and f'"age":"{TOMBSTONE}"' in _images(conn).replace(" ", "")
    assert "five@example.com" in _images(conn)
    # nothing left to rewrite: counted as such
    assert erase(conn, row=(people, 5), policy="keep", columns={"age": "erase"}, reason="r").changes == 0
