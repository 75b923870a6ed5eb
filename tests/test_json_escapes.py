"""Row images holding a JSON escape the database cannot decode: \\u0000, or half a surrogate
pair (a ``json`` column's value, which PostgreSQL's json type accepts with it while its json
functions refuse to read it): every reader lists such changes with the right changed fields, as-of
rebuilds their rows, and a revert refuses them clearly."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import threadline
from threadline import RevertError
from threadline.core.printable import encodable, one_line, printable, printable_value

Conn = psycopg.Connection[Any]

NUL = "\\u0000"  # the escape as JSON text: 6 characters
ROW = '{"s":"' + NUL + '"}'
HIGH, LOW = "\\ud83d", "\\ude00"  # halves of a surrogate pair (together: U+1F600)

# each escape as JSON text, and as Python decodes it
ESCAPES = {"nul": (NUL, "\x00"), "half_pair": (HIGH, "\ud83d"), "low_half": (LOW, "\ude00")}

# json texts that differ only in how backslashes and \u0000 escapes follow each other: pairwise
# different as text, so an update from any one to another changes the column
TRICKY = [
    '"' + NUL + '"',  # the character NUL
    '"\\\\u0000"',  # a backslash, then the text u0000
    '"\\\\' + NUL + '"',  # a backslash, then NUL
    '"' + NUL + NUL + '"',  # two NULs
    '"' + NUL + 'u0000"',  # NUL, then the text u0000
    '"\\\\\\\\u0000"',  # two backslashes, then the text u0000
    '{"' + NUL + '": 1}',  # NUL as a key
    '"u0000"',
    '"\\u0001"',
    '"' + HIGH + '"',  # half a pair
    '"\\\\' + HIGH[1:] + '"',  # a backslash, then the text ud83d
    '"' + LOW + HIGH + '"',  # two halves in the wrong order
    '"' + HIGH + LOW + '"',  # a whole pair
    '"\U0001f600"',  # the same character, written as such
    '{"' + HIGH + '": 1}',  # half a pair as a key
]


def _cli(*args: str, code: int = 0) -> str:
    """The CLI's output (its standard error when it is expected to fail with ``code``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    res = subprocess.run(
        [sys.executable, "-m", "threadline.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == code, (args, res.stdout, res.stderr)
    return res.stderr if code else res.stdout


@pytest.fixture(params=sorted(ESCAPES))
def escape(request: pytest.FixtureRequest) -> tuple[str, str]:
    """An escape the database cannot decode, as JSON text and as Python decodes it."""
    return ESCAPES[request.param]


@pytest.fixture
def jn(conn: Conn, escape: tuple[str, str]) -> str:
    """A tracked table ``app.jn`` with a ``json`` column, its row 7 holding ``escape`` and updated
    (its text column v) in a transaction of correlation id ``nul-1``."""
    conn.execute("CREATE TABLE app.jn (id int PRIMARY KEY, j json, v text)")
    threadline.ddl.track(conn, "app.jn")
    with threadline.context(correlation_id="nul-1"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.jn VALUES (7, %s::json, 'a')", ['{"s":"' + escape[0] + '"}'])
        conn.execute("UPDATE app.jn SET v = 'b' WHERE id = 7")
    return "app.jn"


def test_history_timeline_and_trace_read_an_update_of_a_row_holding_the_escape(
    conn: Conn, dsn: str, jn: str, escape: tuple[str, str]
) -> None:
    update, insert = threadline.history(conn, jn, 7)
    assert (update.op, update.changed_fields, insert.op) == ("update", ("v",), "insert")
    assert update.after == {"id": 7, "j": {"s": escape[1]}, "v": "b"}
    assert update.before == {"id": 7, "j": {"s": escape[1]}, "v": "a"}
    page = threadline.timeline(conn, table=jn)
    assert [(c.op, c.changed_fields) for c in page] == [("insert", None), ("update", ("v",))]
    assert [c.changed_fields for c in threadline.timeline(conn, correlation_id="nul-1")] == [None, ("v",)]
    found = threadline.trace(conn, "nul-1")
    assert [c.changed_fields for node in found.walk() for tx in node.transactions for c in tx.changes] == [
        None,
        ("v",),
    ]
    assert threadline.as_of(conn, jn, 7, datetime.now(timezone.utc)) == update.after
    assert threadline.as_of(conn, jn, 7, insert.captured_at) == {"id": 7, "j": {"s": escape[1]}, "v": "a"}

    async def read(dsn: str) -> list[threadline.Change]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return await threadline.history_async(aconn, jn, 7)

    assert [c.changed_fields for c in asyncio.run(read(dsn))] == [("v",), None]


def test_changed_fields_tell_every_value_apart_as_text(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.tricky (id int PRIMARY KEY, j json, n int, k json)")
    threadline.ddl.track(conn, "app.tricky")
    conn.execute("INSERT INTO app.tricky VALUES (1, %s::json, 0, %s::json)", [TRICKY[0], ROW])
    expected: list[tuple[str, ...]] = []
    current, n = TRICKY[0], 0
    for old, new in itertools.permutations(TRICKY, 2):
        if old != current:  # get there first
            n += 1
            conn.execute("UPDATE app.tricky SET j = %s::json, n = %s WHERE id = 1", [old, n])
            expected.append(("j", "n"))
        n += 1
        conn.execute("UPDATE app.tricky SET j = %s::json, n = %s WHERE id = 1", [new, n])
        expected.append(("j", "n"))
        current = new
    # j as it is (NUL), only n changing; then only k, from NUL to a backslash before u0000
    conn.execute("UPDATE app.tricky SET n = n + 1 WHERE id = 1")
    conn.execute('UPDATE app.tricky SET k = \'{"s":"\\\\u0000x"}\' WHERE id = 1')
    expected += [("n",), ("k",)]
    updates = [c for c in reversed(threadline.history(conn, "app.tricky", 1)) if c.op == "update"]
    assert [c.changed_fields for c in updates] == expected
    assert updates[-1].after is not None and updates[-1].after["k"] == {"s": "\\u0000x"}


def test_changed_fields_of_a_multi_row_update_and_of_a_column_named_with_a_backslash(conn: Conn) -> None:
    conn.execute('CREATE TABLE app.multi (id int PRIMARY KEY, "a\\b" int, j json, "q""x" text)')
    threadline.ddl.track(conn, "app.multi")
    conn.execute("INSERT INTO app.multi SELECT g, g, %s::json, 'q' FROM generate_series(1, 3) g", [ROW])
    conn.execute('UPDATE app.multi SET "a\\b" = "a\\b" + 1 WHERE id = 1')  # one row: whole images
    conn.execute('UPDATE app.multi SET "a\\b" = "a\\b" + 1, "q""x" = \'r\'')  # three: changed old values
    conn.execute("UPDATE app.multi SET j = %s::json WHERE id < 3", ['{"s":"' + NUL + NUL + '"}'])
    first = [c for c in reversed(threadline.history(conn, "app.multi", 1)) if c.op == "update"]
    assert [c.changed_fields for c in first] == [("a\\b",), ("a\\b", 'q"x'), ("j",)]
    assert first[-1].before == {"id": 1, "a\\b": 3, "j": {"s": "\x00"}, 'q"x': "r"}
    assert first[-1].after == {"id": 1, "a\\b": 3, "j": {"s": "\x00\x00"}, 'q"x': "r"}
    third = [c.changed_fields for c in threadline.history(conn, "app.multi", 3) if c.op == "update"]
    assert third == [("a\\b", 'q"x')]


def test_export_writes_changes_holding_the_escape_in_every_format(
    conn: Conn, jn: str, escape: tuple[str, str]
) -> None:
    out = io.StringIO()
    assert threadline.export(conn, out, "ndjson", table=jn) == 2
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["op"], r["changed_fields"]) for r in rows] == [("insert", None), ("update", ["v"])]
    assert rows[1]["before"]["j"] == {"s": escape[1]} and rows[1]["after"]["v"] == "b"

    out = io.StringIO()
    threadline.export(conn, out, "json", correlation_id="nul-1")
    assert [r["changed_fields"] for r in json.loads(out.getvalue())["changes"]] == [None, ["v"]]

    out = io.StringIO()
    threadline.export(conn, out, "csv")
    data = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["op"], r["changed_fields"]) for r in data] == [("insert", ""), ("update", '["v"]')]
    assert json.loads(data[1]["after"])["j"] == {"s": escape[1]}


def test_the_cli_lists_and_exports_changes_holding_the_escape(
    dsn: str, jn: str, escape: tuple[str, str]
) -> None:
    # half a pair decodes to a lone surrogate, which UTF-8 cannot encode: printed as its escape
    history = _cli("history", jn, "7", "--dsn", dsn)
    assert "v: a → b" in history and '{"s": "' + escape[0] + '"}' in history
    assert [c["changed_fields"] for c in json.loads(_cli("history", jn, "7", "--json", "--dsn", dsn))] == [
        ["v"],
        None,
    ]
    timeline = json.loads(_cli("timeline", "--json", "--dsn", dsn))
    assert [c["changed_fields"] for c in timeline["changes"]] == [None, ["v"]]
    assert "update  app.jn" in _cli("timeline", "--dsn", dsn)
    assert "app.jn" in _cli("trace", "nul-1", "--dsn", dsn)
    lines = _cli("export", "--format", "ndjson", "--dsn", dsn).splitlines()
    assert [json.loads(line)["changed_fields"] for line in lines] == [None, ["v"]]


def test_as_of_a_table_rebuilds_rows_known_from_their_next_change(
    conn: Conn, dsn: str, escape: tuple[str, str]
) -> None:
    conn.execute("CREATE TABLE app.base (id int PRIMARY KEY, j json, n int)")
    row = '{"s":"' + escape[0] + '"}'
    conn.execute("INSERT INTO app.base SELECT g, %s::json, g FROM generate_series(1, 4) g", [row])
    threadline.ddl.track(conn, "app.base")
    threadline.take_baseline(conn, "app.base")
    then = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    conn.execute("UPDATE app.base SET n = n + 10 WHERE id < 3")  # two rows: before has n alone
    conn.execute("UPDATE app.base SET n = n + 10, j = '[]' WHERE id = 3")  # one row: whole images
    conn.execute("DELETE FROM app.base WHERE id = 4")
    was = [{"id": i, "j": {"s": escape[1]}, "n": i} for i in range(1, 5)]
    assert list(threadline.as_of(conn, "app.base", at=then)) == was
    assert [threadline.as_of(conn, "app.base", i, then) for i in range(1, 5)] == was
    now = [{"id": i, "j": [] if i == 3 else {"s": escape[1]}, "n": i + 10} for i in range(1, 4)]
    assert list(threadline.as_of(conn, "app.base", at=datetime.now(timezone.utc))) == now

    async def read(dsn: str) -> list[dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            return [row async for row in await threadline.as_of_async(aconn, "app.base", at=then)]

    assert asyncio.run(read(dsn)) == was
    out = _cli("as-of", "app.base", "--at", then.isoformat(), "--dsn", dsn)
    assert [json.loads(line) for line in out.splitlines()] == was


def test_revert_refuses_changes_holding_the_escape_and_changes_nothing(conn: Conn, dsn: str, jn: str) -> None:
    tx = threadline.history(conn, jn, 7)[0].transaction_id
    with pytest.raises(RevertError) as refused:
        threadline.revert(conn, correlation_id="nul-1")
    message = str(refused.value)
    assert "\\u0000" in message and "app.jn (id=7)" in message and "column j" in message
    with pytest.raises(RevertError, match="u0000"):
        threadline.revert(conn, transaction_id=tx, dry_run=True)
    refused_cli = _cli("revert", "--correlation-id", "nul-1", "--dsn", dsn, code=1)
    assert refused_cli.startswith("Error: these changes cannot be reverted") and "column j" in refused_cli
    assert conn.execute("SELECT v FROM app.jn WHERE id = 7").fetchone() == ("b",)


def test_revert_of_an_escaped_backslash_before_u0000_is_not_refused(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.lit (id int PRIMARY KEY, j json, v text)")
    conn.execute("INSERT INTO app.lit VALUES (1, %s::json, 'a')", ['{"s":"\\\\u0000"}'])
    threadline.ddl.track(conn, "app.lit")
    with threadline.context(correlation_id="lit-1"), threadline.transaction(conn):
        conn.execute("UPDATE app.lit SET v = 'b', j = %s::json WHERE id = 1", ['{"s":"\\\\\\\\u0000"}'])
    result = threadline.revert(conn, correlation_id="lit-1")
    assert result.applied
    assert conn.execute("SELECT j::text, v FROM app.lit").fetchone() == ('{"s":"\\\\u0000"}', "a")


def test_printable_writes_each_lone_surrogate_as_its_escape() -> None:
    assert printable("a\ud83db\ude00\U0001f600\x00é\n\t") == "a\\ud83db\\ude00\U0001f600\\u0000é\n\t"
    assert encodable("a\ud83db\x00\x1b\u202e") == "a\\ud83db\x00\x1b\u202e"  # exports keep the rest
    assert one_line("a\nb\tc\rd") == "a\\nb\\tc\\u000dd"
    value = {"k\udfff": ["\ud800", {"x": "\udbff"}, 1, None], "n": 1.5}
    assert printable_value(value) == {"k\\udfff": ["\\ud800", {"x": "\\udbff"}, 1, None], "n": 1.5}
    json.dumps(printable_value(value), ensure_ascii=False).encode()  # UTF-8 takes it


def test_a_baseline_of_a_masked_table_holding_the_escape(conn: Conn, escape: tuple[str, str]) -> None:
    # a masked table's snapshots are written without jsonb, as typed capture writes its images
    conn.execute("CREATE TABLE app.snap (id int PRIMARY KEY, j json, secret text)")
    conn.execute("INSERT INTO app.snap VALUES (1, %s::json, 'hidden')", ['{"s":"' + escape[0] + '"}'])
    threadline.ddl.track(conn, "app.snap", mask=["secret"])
    threadline.take_baseline(conn, "app.snap")
    then = datetime.now(timezone.utc)
    assert list(threadline.as_of(conn, "app.snap", at=then)) == [
        {"id": 1, "j": {"s": escape[1]}, "secret": "[masked]"}
    ]


def test_readers_take_what_pythons_json_refuses(conn: Conn) -> None:
    # an integer of more digits than Python converts, nesting deeper than its recursion limit, and
    # a line break between a value's tokens (which must not split an ndjson line)
    conn.execute("CREATE TABLE app.odd (id int PRIMARY KEY, j json, n numeric)")
    threadline.ddl.track(conn, "app.odd")
    deep = "[" * 3000 + "1" + "]" * 3000
    big = "9" * 5000
    with threadline.context(correlation_id="odd-1"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.odd VALUES (1, %s::json, %s::numeric)", [deep, big])
        conn.execute("INSERT INTO app.odd VALUES (2, %s::json, 1)", ['{"a":\n1}'])
        conn.execute("UPDATE app.odd SET n = n - 1")
    (update, insert) = threadline.history(conn, "app.odd", 1)
    assert insert.after == {"id": 1, "j": deep, "n": Decimal(big)}  # too deep: its text
    assert (
        update.changed_fields == ("n",)
        and update.after is not None
        and update.after["n"] == Decimal("9" * 4999 + "8")
    )
    assert len(threadline.timeline(conn, correlation_id="odd-1")) == 4
    out = io.StringIO()
    assert threadline.export(conn, out, "ndjson", correlation_id="odd-1") == 4
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["after"]["j"] == {"a": 1}
    out = io.StringIO()
    threadline.export(conn, out, "json", correlation_id="odd-1", limit=2)  # pages by the last line
    assert out.getvalue().count('"captured_at"') == 2


def test_revert_refuses_a_table_keyed_by_json(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.jkey (id int, k json, v text)")
    threadline.ddl.track(conn, "app.jkey", keys=["k"])
    with threadline.context(correlation_id="jkey-1"), threadline.transaction(conn):
        conn.execute("""INSERT INTO app.jkey VALUES (1, '{"a":1}', 'x')""")
    with pytest.raises(RevertError, match="keyed by k, which may hold json"):
        threadline.revert(conn, correlation_id="jkey-1", dry_run=True)
