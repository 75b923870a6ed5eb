"""An update's before image: the whole old row when its statement changed one row, the old values
of the changed columns only when it changed more. Every reader gives the whole row either way."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ddl, revert

from .conftest import changes

Conn = psycopg.Connection[Any]

ROWS = [
    (1, "alpha", None, Decimal("1.5"), 10),
    (2, "beta", "x", Decimal("2.5"), 20),
    (3, "gamma", "y", Decimal("3.5"), 30),
]


@pytest.fixture
def items(conn: Conn) -> str:
    conn.execute(
        "CREATE TABLE app.items (id int PRIMARY KEY, name text, note text, price numeric, qty int,"
        " hidden text DEFAULT 'h')"
    )
    conn.cursor().executemany(
        "INSERT INTO app.items (id, name, note, price, qty) VALUES (%s, %s, %s, %s, %s)", ROWS
    )
    ddl.track(conn, "app.items", exclude=["hidden"])
    threadline.take_baseline(conn, "app.items")
    return "app.items"


def _stored_updates(conn: Conn) -> list[dict[str, Any]]:
    return [c for c in changes(conn) if c["op"] == "update"]


def _whole(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "note": row[2], "price": row[3], "qty": row[4]}


def _json_whole(row: tuple[Any, ...]) -> dict[str, Any]:
    return {**_whole(row), "price": float(row[3])}


def test_a_bulk_update_stores_the_changed_columns_and_readers_give_the_whole_row(
    conn: Conn, items: str
) -> None:
    before_update = datetime.now(timezone.utc)
    with threadline.context(actor="user:7", correlation_id="req-bulk"), threadline.transaction(conn):
        conn.execute("UPDATE app.items SET qty = qty + 1, note = 'n' WHERE id <= 3")
    stored = _stored_updates(conn)
    assert len(stored) == 3
    # only what changed, the excluded column never: note's old NULL is kept as null
    assert [c["before"] for c in stored] == [
        {"note": None, "qty": 10},
        {"note": "x", "qty": 20},
        {"note": "y", "qty": 30},
    ]
    assert [c["changed_fields"] for c in stored] == [["note", "qty"]] * 3
    assert all("hidden" not in c["after"] for c in stored)
    whole = conn.execute(
        "SELECT threadline.before_row(before, after)::text FROM threadline.changes WHERE op = 'update' ORDER BY id"
    ).fetchall()
    # the whole row in the after image's column order
    assert [list(threadline.core.records.from_json(w[0])) for w in whole] == [
        ["id", "name", "note", "price", "qty"]
    ] * 3

    (first, *_) = threadline.history(conn, items, 1)
    assert first.op == "update" and first.before == _json_whole(ROWS[0])
    assert [(f.field, f.before, f.after) for f in threadline.diff(first)] == [
        ("note", None, "n"),
        ("qty", 10, 11),
    ]
    assert threadline.as_of(conn, items, 2, before_update) == _json_whole(ROWS[1])
    assert sorted(threadline.as_of(conn, items, at=before_update), key=lambda r: r["id"]) == [
        _json_whole(r) for r in ROWS
    ]

    # the same request deletes a row: its revert inserts the row as it was before the first change
    with threadline.context(actor="user:7", correlation_id="req-bulk"), threadline.transaction(conn):
        conn.execute("DELETE FROM app.items WHERE id = 2")
    result = revert(conn, correlation_id="req-bulk", skip_hidden=True)
    assert result.applied
    assert conn.execute("SELECT id, name, note, price, qty FROM app.items ORDER BY id").fetchall() == ROWS


def test_a_single_row_update_keeps_the_whole_old_row(conn: Conn, items: str) -> None:
    conn.execute("UPDATE app.items SET qty = 11 WHERE id = 1")
    (change,) = _stored_updates(conn)
    assert change["before"] == _json_whole(ROWS[0]) and change["changed_fields"] == ["qty"]
    assert conn.execute(
        "SELECT threadline.before_row(before, after)::text = before::text FROM threadline.changes WHERE op = 'update'"
    ).fetchone() == (True,)
    (first,) = [c for c in threadline.history(conn, items, 1) if c.op == "update"]
    assert first.before == _json_whole(ROWS[0])


@pytest.mark.parametrize("shape", ["typed", "typed_masked", "drift_safe", "drift_safe_masked"])
@pytest.mark.parametrize("rows", ["1", "all"])
def test_equal_values_written_differently_are_a_change(conn: Conn, rows: str, shape: str) -> None:
    """numeric 1.5 and 1.50, and a case-only change under a case-insensitive collation, are equal to
    PostgreSQL's `=` but not the same value: a statement of one row or of many records them, in
    every shape of capture code."""
    try:
        conn.execute(
            "CREATE COLLATION IF NOT EXISTS app.nocase (provider = icu, locale = 'und-u-ks-level2',"
            " deterministic = false)"
        )
    except psycopg.errors.FeatureNotSupported:
        pytest.skip("this server has no ICU")
    conn.execute(
        "CREATE TABLE app.prices (id int PRIMARY KEY, price numeric, label text COLLATE app.nocase, secret text)"
    )
    conn.execute("INSERT INTO app.prices VALUES (1, 1.5, 'apple', 's'), (2, 2.5, 'pear', 's')")
    ddl.track(conn, "app.prices", mask=["secret"] if shape.endswith("_masked") else None)
    if shape.startswith("drift_safe"):
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'prices'"
        )
    where = "WHERE id = 1" if rows == "1" else ""
    conn.execute(f"UPDATE app.prices SET price = price::numeric(10, 2) {where}")
    conn.execute(f"UPDATE app.prices SET label = upper(label) {where}")
    stored = _stored_updates(conn)
    n = 1 if rows == "1" else 2
    assert [c["changed_fields"] for c in stored] == [["price"]] * n + [["label"]] * n
    assert [c["after"]["price"] for c in stored[:n]] == [1.5, 2.5][:n]
    first = conn.execute(
        "SELECT threadline.before_row(before, after) ->> 'price', after ->> 'price' FROM threadline.changes"
        " WHERE op = 'update' ORDER BY id LIMIT 1"
    ).fetchone()
    assert first == ("1.5", "1.50")


def test_before_row_merges_a_partial_image_and_leaves_others_alone(conn: Conn) -> None:
    row = conn.execute(
        """SELECT threadline.before_row('{"b":null,"c":"x"}'::json, '{"a":1,"b":2,"c":"y"}'::json)::text,
                  threadline.before_row('{"a":1}'::json, NULL::json)::text,
                  threadline.before_row(NULL::json, '{"a":1}'::json)::text,
                  threadline.before_row('{"b":null}'::jsonb, '{"a":1,"b":2}'::jsonb)::text,
                  threadline.before_row('{}'::json, '{}'::json)::text,
                  threadline.before_row('{"q\\"u\\u00e9":2}'::json, '{"id":1,"q\\"u\\u00e9":3}'::json)::text,
                  threadline.before_row('[1]'::json, '{"a":1}'::json)::text,
                  threadline.before_row('{"a":1}'::jsonb, '[2]'::jsonb)::text"""
    ).fetchone()
    assert row == (
        '{"a":1,"b":null,"c":"x"}',
        '{"a":1}',
        None,
        '{"a": 1, "b": null}',
        "{}",
        '{"id":1,"q\\"u\u00e9":2}',
        "[1]",
        '{"a": 1}',
    )


def test_a_bulk_update_of_hostile_column_names_stores_valid_json(conn: Conn) -> None:
    """Quotes, a backslash, a space and a non-ASCII letter in column names: the changed columns'
    old values are written under their names, escaped, and the whole row comes back."""
    conn.execute(
        'CREATE TABLE app."Od""d; t" (id int PRIMARY KEY, "we""ird\\col" text, "é v" int, other int)'
    )
    conn.execute('INSERT INTO app."Od""d; t" VALUES (1, \'a"b\', 1, 0), (2, NULL, 2, 0)')
    ddl.track(conn, 'app."Od""d; t"')
    conn.execute('UPDATE app."Od""d; t" SET "we""ird\\col" = \'x\\y\', "é v" = "é v" + 1')
    stored = _stored_updates(conn)
    assert [c["before"] for c in stored] == [
        {'we"ird\\col': 'a"b', "é v": 1},
        {'we"ird\\col': None, "é v": 2},
    ]
    whole = [
        r[0]
        for r in conn.execute(
            "SELECT threadline.before_row(before, after)::jsonb FROM threadline.changes"
            " WHERE op = 'update' ORDER BY id"
        ).fetchall()
    ]
    assert whole == [
        {"id": 1, 'we"ird\\col': 'a"b', "é v": 1, "other": 0},
        {"id": 2, 'we"ird\\col': None, "é v": 2, "other": 0},
    ]
