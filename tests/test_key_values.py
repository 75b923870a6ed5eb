"""Row keys given to the readers (``history``, ``as_of``) on the real database: each value finds
the row PostgreSQL would find, or is refused with :class:`InvalidKey`."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import threadline
from threadline.core.errors import InvalidFilter, InvalidKey, TableNotFound

from .test_cli import run


def _write(conn: psycopg.Connection[Any], *statements: str) -> None:
    with threadline.context(actor="user:1"), threadline.transaction(conn):
        for statement in statements:
            conn.execute(statement)


def test_numeric_keys_beyond_float_range_find_their_own_row(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.big (k numeric PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.big")
    huge = "9" * 5000
    _write(
        conn,
        "INSERT INTO app.big VALUES ('Infinity', 'inf'), (1e400, 'e400')",
        f"INSERT INTO app.big VALUES ({huge}, 'huge')",
    )
    assert [c.after["v"] for c in threadline.history(conn, "app.big", Decimal("1e400"))] == ["e400"]
    assert [c.after["v"] for c in threadline.history(conn, "app.big", "1e400")] == ["e400"]
    assert [c.after["v"] for c in threadline.history(conn, "app.big", "Infinity")] == ["inf"]
    assert [c.after["v"] for c in threadline.history(conn, "app.big", huge)] == ["huge"]
    assert [c.after["v"] for c in threadline.history(conn, "app.big", 10**5000 - 1)] == ["huge"]


def test_char_keys_are_padded_as_postgresql_pads_them(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.codes (code char(5) PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.codes")
    _write(conn, "INSERT INTO app.codes VALUES ('ab', 'x')")
    for given in ("ab", "ab   ", "ab "):
        assert [c.after["v"] for c in threadline.history(conn, "app.codes", given)] == ["x"]
    with pytest.raises(InvalidKey, match=r"at most 5 characters"):
        threadline.history(conn, "app.codes", "abcdef")


def test_bad_key_values_are_refused_with_invalid_key(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.items (id bigint PRIMARY KEY, name text)")
    conn.execute("CREATE TABLE app.named (name text PRIMARY KEY)")
    threadline.ddl.track(conn, "app.items")
    threadline.ddl.track(conn, "app.named")
    for bad, message in (
        (10**5000, "range of bigint"),
        (2**63, "range of bigint"),
        ("9" * 40, "not a valid int"),
    ):
        with pytest.raises(InvalidKey, match=message):
            threadline.history(conn, "app.items", bad)
    with pytest.raises(InvalidKey, match="NUL"):
        threadline.history(conn, "app.named", "a\x00b")


def test_a_dropped_table_truncated_first_keeps_its_key_columns(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.gone (id int PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.gone")
    _write(conn, "TRUNCATE app.gone")
    _write(conn, "INSERT INTO app.gone VALUES (1, 'a')")
    conn.execute("DROP TABLE app.gone")
    assert [c.op for c in threadline.history(conn, "app.gone", 1)] == ["insert"]


def test_arguments_out_of_range_are_refused_as_threadline_errors(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    conn.execute("CREATE TABLE app.items (id bigint PRIMARY KEY)")
    threadline.ddl.track(conn, "app.items")
    _write(conn, "INSERT INTO app.items VALUES (1)")
    with pytest.raises(InvalidFilter, match="larger than"):
        threadline.history(conn, "app.items", 1, limit=2**63)
    with pytest.raises(InvalidFilter, match="larger than"):
        threadline.export(conn, io.StringIO(), "csv", limit=2**63 - 1)
    with pytest.raises(InvalidFilter, match="batch_size"):
        threadline.export(conn, io.StringIO(), "csv", batch_size=2**40)
    with pytest.raises(TableNotFound):
        threadline.timeline(conn, table="app.\x00items")
    end_of_time = datetime.max.replace(tzinfo=timezone.utc) - timedelta(minutes=30)
    assert list(threadline.timeline(conn, table="app.items", since=end_of_time)) == []
    with pytest.raises(InvalidFilter, match="out of range"):
        threadline.timeline(conn, since=datetime.min.replace(tzinfo=timezone(timedelta(hours=1))))
    for args in (
        ("timeline", "--since", "99999999d"),
        ("history", "app.items", "1", "--as-of", "0001-01-01T00:00:00+01:00"),
    ):
        res = run(*args, "--dsn", dsn)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_a_timestamptz_key_is_one_key_whatever_zone_its_writers_set(
    conn: psycopg.Connection[Any], typed: bool
) -> None:
    conn.execute("CREATE TABLE app.slots (at timestamptz PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.slots")
    if not typed:
        conn.execute("SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables")
    for zone, statement in (
        ("UTC", "INSERT INTO app.slots VALUES ('2024-05-01 12:00:00.5+00', 'a')"),
        ("America/New_York", "UPDATE app.slots SET v = 'b'"),
        ("Asia/Kolkata", "UPDATE app.slots SET v = 'c'"),
    ):
        conn.execute("SELECT set_config('TimeZone', %s, false)", [zone])
        _write(conn, statement)
    keys = conn.execute("SELECT DISTINCT pk::text FROM threadline.changes").fetchall()
    assert keys == [('{"at": "2024-05-01T12:00:00.5+00:00"}',)]
    at = datetime(2024, 5, 1, 17, 30, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    for given in (at, "2024-05-01T08:00:00.5-04:00", "2024-05-01 12:00:00.5Z", "2024-05-01 08:00:00.5-04"):
        assert [c.after["v"] for c in threadline.history(conn, "app.slots", given)] == ["c", "b", "a"]
    assert threadline.as_of(conn, "app.slots", at, datetime.now(timezone.utc))["v"] == "c"
    threadline.take_baseline(conn, "app.slots")
    rows = list(threadline.as_of(conn, "app.slots", at=datetime.now(timezone.utc)))
    assert [r["v"] for r in rows] == ["c"]
    with pytest.raises(InvalidKey, match="timestamptz"):
        threadline.history(conn, "app.slots", "yesterday-ish")


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_bytea_and_interval_keys_are_one_key_whatever_their_writers_print(
    conn: psycopg.Connection[Any], typed: bool
) -> None:
    # bytea_output and IntervalStyle change how such a key prints: without a setting of its own
    # the capture code would record one row under as many keys as its writers had settings (and
    # images of a bytea column that differ where the bytes do not)
    conn.execute("CREATE TABLE app.blobs (k bytea PRIMARY KEY, v text, b bytea)")
    conn.execute("CREATE TABLE app.spans (k interval PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.blobs")
    threadline.ddl.track(conn, "app.spans")
    if not typed:
        conn.execute("SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables")
    _write(
        conn,
        "INSERT INTO app.blobs VALUES ('\\x41ff', 'a', 'ab')",
        "INSERT INTO app.spans VALUES ('1 day 2 hours', 'a')",
    )
    for output, style, v in (("escape", "iso_8601", "b"), ("hex", "sql_standard", "c")):
        conn.execute(
            "SELECT set_config('bytea_output', %s, false), set_config('IntervalStyle', %s, false)",
            [output, style],
        )
        _write(conn, f"UPDATE app.blobs SET v = '{v}'", f"UPDATE app.spans SET v = '{v}'")
    conn.execute("RESET bytea_output")
    conn.execute("RESET IntervalStyle")
    keys = conn.execute(
        "SELECT table_name, array_agg(DISTINCT pk::text) FROM threadline.changes GROUP BY 1 ORDER BY 1"
    )
    assert keys.fetchall() == [("blobs", ['{"k": "\\\\x41ff"}']), ("spans", ['{"k": "1 day 02:00:00"}'])]
    found = threadline.history(conn, "app.blobs", "\\x41ff")
    assert [(c.after["v"], c.after["b"]) for c in found] == [
        ("c", "\\x6162"),
        ("b", "\\x6162"),
        ("a", "\\x6162"),
    ]
    assert [c.after["v"] for c in threadline.history(conn, "app.spans", "1 day 02:00:00")] == ["c", "b", "a"]
    conn.execute("SET bytea_output = 'escape'")
    threadline.take_baseline(conn, "app.blobs")
    conn.execute("RESET bytea_output")
    snapshot = threadline.history(conn, "app.blobs", "\\x41ff")[0]
    assert snapshot.after is not None and snapshot.after["b"] == "\\x6162"
    assert [c.op for c in threadline.history(conn, "app.blobs", "\\x41ff")] == [
        "snapshot",
        "update",
        "update",
        "insert",
    ]


def test_numbers_a_float_cannot_hold_are_read_exactly(conn: psycopg.Connection[Any], dsn: str) -> None:
    conn.execute("CREATE TABLE app.ledger (id int PRIMARY KEY, amount numeric(30,2), rate float8)")
    threadline.ddl.track(conn, "app.ledger")
    _write(conn, "INSERT INTO app.ledger VALUES (1, 1234567890123456789012345678.91, 1.5)")
    _write(conn, "UPDATE app.ledger SET amount = 1234567890123456789012345678.92")
    update, insert = threadline.history(conn, "app.ledger", 1)
    assert update.after is not None and update.before is not None and insert.after is not None
    assert update.after["amount"] == Decimal("1234567890123456789012345678.92")
    assert update.before["amount"] == Decimal("1234567890123456789012345678.91")
    assert insert.after["rate"] == 1.5 and isinstance(insert.after["rate"], float)
    out = run("history", "app.ledger", "1", "--dsn", dsn).stdout
    assert "1234567890123456789012345678.91 → 1234567890123456789012345678.92" in out, out
    data = run("history", "app.ledger", "1", "--json", "--dsn", dsn).stdout
    assert '"amount": 1234567890123456789012345678.92' in data, data


def test_a_whole_table_as_it_was_reads_numbers_exactly(conn: psycopg.Connection[Any], dsn: str) -> None:
    conn.execute("CREATE TABLE app.book (id int PRIMARY KEY, amount numeric, rate float8, doc json)")
    conn.execute(
        "INSERT INTO app.book VALUES (1, 1234567890123456789012345678.91, 1.5, '{\"x\": 1e400}'), (2, 0.1, 2.5, NULL)"
    )
    threadline.ddl.track(conn, "app.book")
    threadline.take_baseline(conn, "app.book")  # row 2 is known from its snapshot
    _write(conn, "INSERT INTO app.book VALUES (3, 98765432109876543210.5, 0.25, '[1e400]')")
    then = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # row 1 from its next change
    _write(conn, "UPDATE app.book SET amount = amount + 1 WHERE id = 1")
    rows = list(threadline.as_of(conn, "app.book", at=then))
    assert [(r["amount"], r["rate"], r["doc"]) for r in rows] == [
        (Decimal("1234567890123456789012345678.91"), 1.5, {"x": Decimal("1e400")}),
        (0.1, 2.5, None),
        (Decimal("98765432109876543210.5"), 0.25, [Decimal("1e400")]),
    ]
    assert isinstance(rows[0]["rate"], float)
    shown = run("as-of", "app.book", "--at", then.isoformat(), "--dsn", dsn)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == (
        '{"id":1,"amount":1234567890123456789012345678.91,"rate":1.5,"doc":{"x":1E+400}}'
    )
    table = run("as-of", "app.book", "--at", then.isoformat(), "--format", "csv", "--dsn", dsn).stdout
    assert table.splitlines()[3] == "3,98765432109876543210.5,0.25,[1E+400]", table


def test_keys_of_numeric_types_written_as_json_strings_find_their_row(
    conn: psycopg.Connection[Any],
) -> None:
    # oid, money and the reg* types are numeric, but to_json() writes them as strings: a key
    # given for one must be looked up as the string, whether given as a number or as text
    conn.execute("CREATE TABLE app.by_oid (k oid PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE app.by_money (k money PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE app.by_reg (k regclass PRIMARY KEY, v text)")
    for table in ("app.by_oid", "app.by_money", "app.by_reg"):
        threadline.ddl.track(conn, table)
    _write(
        conn,
        "INSERT INTO app.by_oid VALUES (4294967295, 'oid')",
        "INSERT INTO app.by_money VALUES ('1.50', 'money')",
        "INSERT INTO app.by_reg VALUES ('pg_class', 'reg')",
    )
    for table, key in (
        ("app.by_oid", 4294967295),
        ("app.by_oid", "4294967295"),
        ("app.by_money", "$1.50"),
        ("app.by_reg", "pg_class"),
    ):
        assert [c.op for c in threadline.history(conn, table, key)] == ["insert"], (table, key)
    assert threadline.as_of(conn, "app.by_oid", 4294967295, datetime.now(timezone.utc))["v"] == "oid"
