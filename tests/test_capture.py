"""What the capture triggers record, against a real PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ActorRef, ddl
from threadline.core.errors import InvalidTrackOption, NoPrimaryKey, UnknownColumn, UnknownTable

from .conftest import changed_before, changes, key_indexes, transactions

Conn = psycopg.Connection[Any]


def test_insert_update_delete_truncate_are_recorded(conn: Conn, posts: str) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id, title, body) VALUES (1, 'a', 'b')")
    with conn.transaction():
        conn.execute("UPDATE app.posts SET title = 'A' WHERE id = 1")
    with conn.transaction():
        conn.execute("DELETE FROM app.posts WHERE id = 1")
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id, title) VALUES (2, 'z')")
        conn.execute("TRUNCATE app.posts")
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["insert", "update", "delete", "insert", "truncate"]
    ins, upd, dele, _, trunc = rows
    full = {"id": 1, "title": "a", "body": "b", "secret": None, "views": 0}
    assert ins["pk"] == {"id": 1} and ins["after"] == full and ins["before"] is None
    assert upd["after"] == {**full, "title": "A"}
    assert changed_before(upd) == {"title": "a"} and upd["changed_fields"] == ["title"]
    assert upd["before"] == full and upd["stored_changed_fields"] is None
    assert dele["before"] == {**full, "title": "A"} and dele["after"] is None
    assert (trunc["table_schema"], trunc["table_name"], trunc["pk"]) == ("app", "posts", None)
    assert len(transactions(conn)) == 4


def test_update_that_changes_nothing_is_not_recorded(conn: Conn, posts: str) -> None:
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    conn.execute("UPDATE app.posts SET title = 'a' WHERE id = 1")
    conn.execute("UPDATE app.posts SET title = 'b' WHERE id = 999")
    assert [r["op"] for r in changes(conn)] == ["insert"]
    assert len(transactions(conn)) == 1  # no transaction row for transactions without changes


def test_statements_that_record_nothing_leave_the_transaction_row_to_the_first_that_does(
    conn: Conn, posts: str
) -> None:
    # the first captured statement takes the row's id first and writes the row only once it has
    # recorded a change; a statement that records none leaves no row and no marker behind
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    with threadline.context(actor="user:5", correlation_id="req-none"), threadline.transaction(conn):
        conn.execute("UPDATE app.posts SET title = 'a' WHERE id = 1")
        conn.execute("UPDATE app.posts SET title = 'b' WHERE id = 999")
        conn.execute("DELETE FROM app.posts WHERE id = 999")
        conn.execute("INSERT INTO app.posts (id) SELECT 2 WHERE false")
        assert conn.execute(
            "SELECT count(*) FROM threadline.transactions WHERE xid = pg_current_xact_id()"
        ).fetchone() == (0,)
        marker = conn.execute("SELECT current_setting('threadline.txctx_threadline', true)").fetchone()
        assert marker in [(None,), ("",)]
        conn.execute("UPDATE app.posts SET title = 'b' WHERE id = 1")
    insert, update = changes(conn)
    assert update["op"] == "update" and update["transaction_id"] != insert["transaction_id"]
    first, second = transactions(conn)
    assert first["id"] == insert["transaction_id"]
    assert second["id"] == update["transaction_id"] and second["correlation_id"] == "req-none"
    assert second["actor"] == {"type": "user", "id": "5"} and second["context_error"] is None


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_columns_named_like_the_capture_code_variables_are_captured(conn: Conn, typed: bool) -> None:
    # the generated function has variables (tx, fresh, n, raw, j, marker, drifted) and a block
    # label; a table whose columns carry those names must be captured all the same
    conn.execute(
        "CREATE TABLE app.odd (tx int PRIMARY KEY, fresh bool, n int, raw text, j text, marker text,"
        ' drifted int, "threadline capture" text, t text)'
    )
    ddl.track(conn, "app.odd", mask=["marker"])
    if not typed:
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'odd'"
        )
    (mode,) = (
        conn.execute("SELECT mode FROM threadline.tracking_status() WHERE table_name = 'odd'").fetchone()
        or ()
    )
    assert mode == ("typed" if typed else "drift_safe")
    with threadline.context(actor="user:3", correlation_id="req-odd"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.odd VALUES (1, true, 1, 'r', 'j', 'secret', 0, 'c', 't')")
        conn.execute("UPDATE app.odd SET j = 'j2', marker = 'secret2' WHERE tx = 1")
        conn.execute("DELETE FROM app.odd")
        conn.execute("TRUNCATE app.odd")
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["insert", "update", "delete", "truncate"]
    assert len({r["transaction_id"] for r in rows}) == 1
    assert rows[0]["after"] == {
        "tx": 1, "fresh": True, "n": 1, "raw": "r", "j": "j", "marker": "[masked]",
        "drifted": 0, "threadline capture": "c", "t": "t",
    }  # fmt: skip
    assert rows[1]["changed_fields"] == ["j", "marker"] and "secret" not in repr(rows)
    (tx,) = transactions(conn)
    assert (tx["correlation_id"], tx["actor"]) == ("req-odd", {"type": "user", "id": "3"})


def test_excluded_columns_never_appear_and_masked_show_a_placeholder(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.users (id int PRIMARY KEY, email text, pw text, token text)")
    ddl.track(conn, "app.users", exclude=["pw"], mask=["token"])
    conn.execute("INSERT INTO app.users VALUES (1, 'a@x', 'hash1', 'tok1')")
    conn.execute("UPDATE app.users SET pw = 'hash2'")  # excluded only: not an update
    conn.execute("UPDATE app.users SET token = 'tok2'")
    conn.execute("UPDATE app.users SET email = 'b@x'")
    conn.execute("DELETE FROM app.users")
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["insert", "update", "update", "delete"]
    text = repr(rows)
    assert "hash" not in text and "tok1" not in text and "tok2" not in text and "pw" not in text
    ins, tok, email, dele = rows
    assert ins["after"] == {"id": 1, "email": "a@x", "token": "[masked]"}
    assert tok["changed_fields"] == ["token"] and changed_before(tok) == {"token": "[masked]"}
    assert changed_before(email) == {"email": "a@x"} and email["changed_fields"] == ["email"]
    assert email["before"]["token"] == "[masked]"
    assert dele["before"] == {"id": 1, "email": "b@x", "token": "[masked]"}
    # the images are the row's own json text, in column order, as for a table without masks
    stored = conn.execute("SELECT after::text FROM threadline.changes WHERE op = 'insert'").fetchone()
    assert stored == ('{"id":1,"email":"a@x","token":"[masked]"}',)


def test_one_transaction_row_per_transaction_with_its_context(conn: Conn, posts: str) -> None:
    with (
        threadline.context(actor=ActorRef.user("42"), correlation_id="req-1", origin="web"),
        threadline.transaction(conn),
    ):
        conn.execute("INSERT INTO app.posts (id) SELECT g FROM generate_series(1, 3) g")
        conn.execute("UPDATE app.posts SET views = views + 1")
        conn.execute("DELETE FROM app.posts WHERE id = 3")
    rows = changes(conn)
    assert len(rows) == 7 and len({r["transaction_id"] for r in rows}) == 1
    (tx,) = transactions(conn)
    assert tx["actor"] == {"type": "user", "id": "42"}
    assert (tx["correlation_id"], tx["origin"], tx["context_error"]) == ("req-1", "web", None)


def test_rollback_leaves_nothing_and_savepoint_rollback_removes_only_its_changes(
    conn: Conn, posts: str
) -> None:
    with pytest.raises(ZeroDivisionError), conn.transaction():
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        raise ZeroDivisionError
    assert changes(conn) == [] and transactions(conn) == []

    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO app.posts (id) VALUES (2)")
            conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        conn.execute("INSERT INTO app.posts (id) VALUES (3)")
    assert [r["pk"]["id"] for r in changes(conn)] == [1, 3]
    assert len(transactions(conn)) == 1

    # transaction row created inside a rolled-back savepoint: the next write makes a new one
    with conn.transaction():
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute("INSERT INTO app.posts (id) VALUES (10)")
            raise ZeroDivisionError
        conn.execute("INSERT INTO app.posts (id) VALUES (11)")
    assert [r["pk"]["id"] for r in changes(conn)] == [1, 3, 11]
    assert len(transactions(conn)) == 2


def test_context_set_after_the_first_write_wins(conn: Conn, posts: str) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        with threadline.context(actor="user:late", correlation_id="late-1"):
            threadline.apply_context(conn)
        conn.execute("INSERT INTO app.posts (id) VALUES (2)")
    (tx,) = transactions(conn)
    assert tx["actor"] == {"type": "user", "id": "late"} and tx["correlation_id"] == "late-1"


@pytest.mark.parametrize(
    "raw",
    [
        "not json at all",
        '{"v":1,"actor":{"type":"user"}}',
        '{"v":1,"actor":{"type":"Robert\'); DROP TABLE app.posts;--","id":"1"}}',
        '{"v":1,"actor":"user:1"}',
        '{"v":1,"actor":{"type":"user","id":"1","admin":true}}',
        '{"v":9,"actor":{"type":"user","id":"1"}}',
        '{"actor":{"type":"user","id":"1"}}',
        '{"v":1,"correlation_id":"' + "x" * 300 + '"}',
        '{"v":1,"correlation_id":"a\\u0000b"}',
        '{"v":1,"meta":[1,2]}',
        '[{"v":1}]',
        "x" * 20000,
        '{"v":1,"correlation_id":"' + "x" * 257 + '"}',
        '{"v":1,"correlation_id":"a\\u0007b"}',
        '{"v":1,"correlation_id":["a"]}',
        '{"v":1,"request_id":7}',
        '{"v":1,"origin":""}',
        '{"v":1,"actor":{"type":"user","id":["1"]}}',
        '{"v":1,"actor":{"type":["user"],"id":"1"}}',
        '{"v":1,"actor":{"type":"user","id":"1","display":"a\\nb"}}',
        '{"v":1,"actor":null}',
        '{"v":1,"job":"celery"}',
        '{"v":1,"incoming_error":5}',
        '{"v":1,"actor":{"type":"a' + "b" * 32 + '","id":"1"}}',
        '{"v":1,"actor":{"type":"user","id":"' + "1" * 257 + '"}}',
        '{"v":1,"actor":{"type":"user","id":"1","display":"' + "d" * 257 + '"}}',
    ],
)
def test_malformed_context_never_blocks_the_write_and_is_recorded_invalid(
    conn: Conn, posts: str, raw: str
) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('threadline.context', %s, true)", [raw])
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (tx,) = transactions(conn)
    assert tx["context_error"], tx
    assert tx["actor"] is None and tx["correlation_id"] is None
    assert conn.execute("SELECT count(*) FROM app.posts").fetchone() == (1,)


def test_longest_allowed_values_are_accepted(conn: Conn, posts: str) -> None:
    longest = "é" * 256  # characters, not bytes
    raw = (
        '{"v":1,"actor":{"type":"a'
        + "b" * 31
        + '","id":"'
        + longest
        + '"},"correlation_id":"'
        + longest
        + '","job":{},"meta":{"k":[1]}}'
    )
    with conn.transaction():
        conn.execute("SELECT set_config('threadline.context', %s, true)", [raw])
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (tx,) = transactions(conn)
    assert tx["context_error"] is None
    assert tx["actor"] == {"type": "a" + "b" * 31, "id": longest} and tx["correlation_id"] == longest


_LONG = "x" * 256
# a Celery task's context as the worker sets it (366 bytes; a root task's job has no parent_id)
_TASK_CONTEXT = (
    '{"actor":{"id":"42","type":"user"},"causation_id":"61f03d52-692e-4060-9f0d-d70de2fc2a07",'
    '"correlation_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553","job":{"id":"e17e66a5-4b99-445d-bd79-e61d043b838d",'
    '"name":"shop.tasks.send_receipt","parent_id":"61f03d52-692e-4060-9f0d-d70de2fc2a07","retries":0,'
    '"root_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553"},"origin":"celery","v":1}'
)
DECODER_CORPUS = [
    "",
    '{"v":1}',
    '{"v":1.0,"correlation_id":"c"}',
    '{"actor":{"id":"42","type":"user"},"correlation_id":"abc","job":{"id":"x","name":"t","parent_id":null,'
    '"retries":0,"root_id":"y"},"meta":{"a":{"b":[1,2]}},"origin":"celery","request_id":"r1","v":1}',
    '{"v":1,"actor":{"type":"anonymous"}}',
    '{"v":1,"actor":{"type":"anonymous","id":"a1","display":"Ann \\"A\\""}}',
    '{"v":1,"actor":{"type":"user"}}',
    '{"v":1,"actor":{"type":"User","id":"1"}}',
    '{"v":1,"actor":{"type":"a' + "b" * 32 + '","id":"1"}}',
    '{"v":1,"actor":{"type":"user","id":""}}',
    '{"v":1,"actor":{"type":"user","id":1}}',
    '{"v":1,"actor":{"type":"user","id":["1"]}}',
    '{"v":1,"actor":{"type":["user"],"id":"1"}}',
    '{"v":1,"actor":[{"type":"user","id":"1"}]}',
    '{"v":1,"actor":{"type":"user","id":"1","role":"x"}}',
    '{"v":1,"actor":{"type":"user","id":"' + _LONG + '"}}',
    '{"v":1,"actor":{"type":"user","id":"' + _LONG + 'y"}}',
    '{"v":1,"actor":{"type":"user","id":"a\\u0001b"}}',
    '{"v":1,"actor":{"type":"user","id":"a\u007fb"}}',
    '{"v":1,"actor":"user:1"}',
    '{"v":[1]}',
    '{"v":"1"}',
    '{"v":true}',
    '{"v":2}',
    '{"correlation_id":"c"}',
    "[1]",
    '"text"',
    "not json",
    '{"v":1,"extra":1}',
    '{"v":1,"correlation_id":""}',
    '{"v":1,"correlation_id":["c"]}',
    '{"v":1,"correlation_id":7}',
    '{"v":1,"correlation_id":"' + _LONG + '"}',
    '{"v":1,"request_id":"' + _LONG + 'y"}',
    '{"v":1,"causation_id":"a\\nb"}',
    '{"v":1,"origin":{"o":1}}',
    '{"v":1,"job":[]}',
    '{"v":1,"job":null}',
    '{"v":1,"meta":"m"}',
    '{"v":1,"meta":{}}',
    '{"v":1,"incoming_error":"bad header"}',
    '{"v":1,"incoming_error":3}',
    '{"v":1,"correlation_id":"é✓ unicode"}',
    '{"v":1,"correlation_id":"a\u0085b"}',  # C1 control
    '{"v":1,"request_id":"abc\u202edef"}',  # bidi override
    '{"v":1,"actor":{"type":"user","id":"1\u2066"}}',  # bidi isolate
    '{"v":1,"correlation_id":"x\\ud800"}',  # lone surrogate: not valid JSON text for PostgreSQL
    '{"v":1,"correlation_id":"a\\u0000b"}',  # \u0000 cannot be text in PostgreSQL
    '{"v":1,"meta":{"n":1e999999}}',  # out of numeric's range
    '{"v":1,"meta":' + "[" * 8000 + "]" * 8000 + "}",  # deeply nested, within the size cap
    '{"v":1,"meta":{"big":"' + "m" * 17000 + '"}}',
    # short contexts the first check accepts or passes on, at its edges
    '{"v":1.0,"correlation_id":"c"}',
    '{ "v": 1, "correlation_id": "c" }',
    '{"v":1,"v":2}',
    '{"v":1,"correlation_id":"a\\"b"}',  # an escaped quote: valid, through the complete checks
    '{"v":1,"correlation_id":"caf\\u00e9"}',
    '{"v":1,"actor":{"type":"anonymous"}}',
    '{"v":1,"actor":{"display":"Guest","type":"anonymous"}}',
    '{"v":1,"actor":{"type":"user"}}',
    '{"v":1,"actor":{"type":"User","id":"1"}}',
    '{"v":1,"actor":{"type":"a1_","id":"1"}}',
    '{"v":1,"actor":{"type":"' + "a" * 32 + '","id":"1"}}',
    '{"v":1,"actor":{"type":"' + "a" * 33 + '","id":"1"}}',
    '{"v":1,"actor":{"type":"user","id":"1","display":""}}',
    '{"v":1,"job":{"id":"x","args":[1,{"k":"v"}]},"meta":{"k":[1,2]}}',
    '{"v":1,"job":{"id":"x"},"meta":[1]}',
    '{"v":1,"origin":""}',
    '{"v":1,"request_id":"' + "r" * 250 + '"}',  # 275 bytes or less: the first check
    '{"v":1,"request_id":"' + "r" * 256 + '"}',
    '{"v":1,"request_id":"' + "é" * 200 + '"}',  # more than 275 bytes, 200 characters
    '{"v":1,"correlation_id":"a‏b","origin":"web"}',
    # null, true and false where a string or an object belongs
    '{"v":1,"correlation_id":null}',
    '{"v":1,"causation_id":true}',
    '{"v":1,"actor":{"type":"user","id":null}}',
    '{"v":1,"actor":{"type":"user","id":"1","display":null}}',
    '{"v":1,"actor":{"type":"user","id":false}}',
    '{"v":1,"actor":{"type":null,"id":"1"}}',
    '{"v":1,"meta":null,"correlation_id":"c"}',
    '{"v":1,"job":{"eta":null},"correlation_id":"nullable"}',
    # longer than 275 bytes: a Celery task's context takes the second check, which measures its ids
    _TASK_CONTEXT,
    _TASK_CONTEXT.replace('"retries":0', '"parent_id":null,"retries":0'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"' + "o" * 240 + '"'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"' + "o" * 256 + '"'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"' + "o" * 257 + '"'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"' + "é" * 250 + '"'),
    _TASK_CONTEXT.replace('"id":"42"', '"id":"' + _LONG + '"'),
    _TASK_CONTEXT.replace('"id":"42"', '"id":"' + _LONG + 'y"'),
    _TASK_CONTEXT.replace('"id":"42"', '"id":"42","display":"' + _LONG + 'y"'),
    _TASK_CONTEXT.replace('"type":"user"', '"type":"' + "u" * 33 + '"'),
    _TASK_CONTEXT.replace('"type":"user"', '"type":"User"'),
    _TASK_CONTEXT.replace('"correlation_id":"', '"correlation_id":"' + "c" * 200),
    _TASK_CONTEXT.replace('"correlation_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553"', '"correlation_id":""'),
    _TASK_CONTEXT.replace('"correlation_id":"', '"request_id":"' + "r" * 200 + '","correlation_id":"'),
    _TASK_CONTEXT.replace('"retries":0', '"retries":0,"args":[1]'),
    _TASK_CONTEXT.replace('"v":1', '"v":1,"incoming_error":"bad header"'),
    _TASK_CONTEXT.replace('"v":1', '"v":1,"extra":1'),
    _TASK_CONTEXT.replace('"v":1', '"v":2'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"cel\u0085ery"'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":"cel⁦ery"'),
    _TASK_CONTEXT.replace('"origin":"celery"', '"origin":null'),
    _TASK_CONTEXT.replace('"actor":{"id":"42","type":"user"}', '"actor":{"type":"user"}'),
    _TASK_CONTEXT.replace('"job":{', '"meta":{"k":"v"},"job":{'),
    _TASK_CONTEXT.replace('"job":{', '"meta":"m","job":{'),
    '{"v":1,"correlation_id":"' + "c" * 236 + '","origin":"w"}',  # 276 bytes: the second check
    '{"v":1,"origin":"' + "o" * 256 + '","job":{}}',  # printed without its job: 278 bytes
    '{"v":1,"origin":"' + "o" * 257 + '","job":{}}',
    '{"v":1,"meta":{"big":"' + "m" * (16384 - 25) + '"}}',  # 16,384 bytes
    '{"v":1,"meta":{"big":"' + "m" * (16385 - 25) + '"}}',
]


_DECODED_FIELDS = "actor, correlation_id, request_id, causation_id, origin, job, meta, context_error"


def _stored_and_decoded(conn: Conn, raw: str) -> tuple[Any, Any]:
    """The fields the transaction row stored for context ``raw``, and those decode_context() gives.

    The row is stored twice, each time rolled back: by transaction_row(), and by the capture code
    of ``app.posts`` (which runs the usual context's path inline); both must store the same."""
    stored = []
    for write in ("SELECT threadline.transaction_row()", "INSERT INTO app.posts (id) VALUES (1)"):
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('threadline.context', %s, true)", [raw])
            conn.execute(write)
            stored.append(
                conn.execute(
                    f"SELECT {_DECODED_FIELDS} FROM threadline.transactions"
                    " WHERE xid = pg_current_xact_id() AND occurred_at = now()"
                ).fetchall()
            )
    assert stored[0] == stored[1], raw
    decoded = conn.execute(
        f"SELECT {_DECODED_FIELDS} FROM threadline.parse_context(%s) AS p, threadline.decode_context(p.j, p.err)",
        [raw],
    ).fetchone()
    assert len(stored[0]) == 1, raw
    return stored[0][0], decoded


def test_transaction_rows_decode_every_context_as_decode_context_does(conn: Conn, posts: str) -> None:
    # transaction_row() stores a context that passes all checks without calling decode_context();
    # both must give the same fields and the same reason for every value, valid or not
    for raw in DECODER_CORPUS:
        stored, decoded = _stored_and_decoded(conn, raw)
        assert stored == decoded, raw
    valid = [
        raw
        for raw in DECODER_CORPUS
        if raw
        and conn.execute(
            "SELECT d.context_error IS NULL FROM threadline.parse_context(%s) AS p, threadline.decode_context(p.j, p.err) AS d",
            [raw],
        ).fetchone()
        == (True,)
    ]
    assert len(valid) == 35, valid  # the corpus covers every path


def _random_context(rnd: random.Random) -> str:
    """A context text near every edge the two fast paths and the complete checks draw: string
    lengths around 256, texts around 275 and 278 bytes, null, arrays, escapes, characters an id may
    not hold, unknown keys, a job or meta large enough to take the second path."""

    def text() -> str:
        size = rnd.choice([1, 2, 36, 120, 200, 255, 256, 257, 300])
        alphabet = "abcxyz0189-_.:| " + rnd.choice(
            [""] * 24 + ["é✓", '"', "\\", "\u0085", "\u2066", "\u0001"]
        )
        return "".join(rnd.choice(alphabet) for _ in range(size))

    def value() -> Any:
        roll = rnd.random()
        if roll < 0.8:
            return text()
        return rnd.choice([None, None, None, 7, [text()], {"k": text()}, "", True])

    ctx: dict[str, Any] = {"v": rnd.choice([1, 1, 1, 1, 2, "1", 1.0])}
    for key in ("correlation_id", "request_id", "causation_id", "origin"):
        if rnd.random() < 0.5:
            ctx[key] = value() if rnd.random() < 0.3 else text()[: rnd.choice([8, 36, 64])]
    if rnd.random() < 0.8:
        actor: dict[str, Any] = {
            "type": rnd.choice(["user", "service_account", "anonymous", "User", "a" * 32, "a" * 33, ""])
        }
        for key in ("id", "display"):
            if rnd.random() < 0.6:
                actor[key] = value() if rnd.random() < 0.2 else text()[: rnd.choice([2, 36, 256])]
        if rnd.random() < 0.05:
            actor["role"] = "x"
        ctx["actor"] = actor if rnd.random() < 0.95 else rnd.choice(["user:1", None, [actor]])
    for key in ("job", "meta"):
        if rnd.random() < 0.5:
            entries = {
                f"k{i}": value() if rnd.random() < 0.3 else text() for i in range(rnd.choice([1, 3, 12, 80]))
            }
            ctx[key] = entries if rnd.random() < 0.9 else rnd.choice([None, [entries], "m"])
    if rnd.random() < 0.05:
        ctx["incoming_error"] = text()[:40]
    if rnd.random() < 0.03:
        ctx["extra"] = 1
    items = list(ctx.items())
    rnd.shuffle(items)
    return json.dumps(dict(items), separators=(",", ":"), ensure_ascii=rnd.random() < 0.1)


def test_random_contexts_are_stored_as_decode_context_decodes_them(conn: Conn, posts: str) -> None:
    rnd = random.Random(20261207)
    raws = [_random_context(rnd) for _ in range(400)]
    sizes = [len(raw.encode()) for raw in raws]
    # the sample reaches both fast paths and the complete checks' size limit
    assert min(sizes) <= 275 < max(sizes) and sum(s > 16384 for s in sizes) < len(raws) // 4, sizes
    valid = 0
    for raw in raws:
        stored, decoded = _stored_and_decoded(conn, raw)
        assert stored == decoded, raw
        valid += decoded[-1] is None
    assert 30 < valid < 300, valid  # both valid and refused contexts in number


def test_forged_transaction_cache_cannot_borrow_another_context(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:victim"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (victim,) = transactions(conn)
    # the cache holds "<id>/<xid>" and is checked against the row: a bare id, the victim's own
    # (finished) xid, the victim's id with this transaction's xid, a row that does not exist and
    # garbage all give this transaction a row of its own
    forgeries = [
        f"'{victim['id']}'",
        f"'{victim['id']}/{victim['xid']}'",
        f"'{victim['id']}/' || pg_current_xact_id()",
        "'999999/' || pg_current_xact_id()",
        "'12x/' || pg_current_xact_id()",
        "'99999999999999999999999/' || pg_current_xact_id()",
    ]
    for n, forged in enumerate(forgeries, start=2):
        with conn.transaction():
            conn.execute(f"SELECT set_config('threadline.tx_threadline', {forged}, true)")
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [n])
            conn.execute("UPDATE app.posts SET title = 'x' WHERE id = %s", [n])
    rows = changes(conn)
    assert len(rows) == 1 + 2 * len(forgeries) and len(transactions(conn)) == 1 + len(forgeries)
    for row in rows[1:]:
        assert row["transaction_id"] != victim["id"] and row["actor"] is None
    pairs = {}
    for row in rows[1:]:
        pairs.setdefault(row["transaction_id"], []).append(row["op"])
    assert sorted(pairs.values()) == [["insert", "update"]] * len(forgeries)


def test_a_cache_forged_between_two_writes_keeps_one_row_per_transaction(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:victim"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (victim,) = transactions(conn)
    forgeries = [
        "''",
        f"'{victim['id']}/' || pg_current_xact_id()",
        f"'{victim['id']}/{victim['xid']}'",
        "'999999/' || pg_current_xact_id()",
        "'garbage'",
    ]
    for n, forged in enumerate(forgeries, start=2):
        with threadline.context(actor=f"user:{n}"), threadline.transaction(conn):
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [n])
            conn.execute(f"SELECT set_config('threadline.tx_threadline', {forged}, true)")
            conn.execute("UPDATE app.posts SET title = 'x' WHERE id = %s", [n])
    with threadline.context(actor="user:reset"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (99)")
        conn.execute("RESET threadline.tx_threadline")
        conn.execute("DELETE FROM app.posts WHERE id = 99")
    txs = transactions(conn)
    assert len(txs) == 1 + len(forgeries) + 1
    assert len({t["xid"] for t in txs}) == len(txs)  # one row per database transaction
    by_id = {t["id"]: t for t in txs}
    for row in changes(conn)[1:]:
        actor = by_id[row["transaction_id"]]["actor"]
        assert actor == {"type": "user", "id": str(row["pk"]["id"])} or actor == {
            "type": "user",
            "id": "reset",
        }


def test_the_row_marker_cleared_or_forged_keeps_one_row_per_transaction(conn: Conn, posts: str) -> None:
    """The first captured statement skips the lookup of the transaction's row when the setting
    that marks it is empty; whatever a session does to that setting, each transaction ends with
    one row, holding all its changes and its own context."""
    marker = "threadline.txctx_threadline"
    with threadline.context(actor="user:victim"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (victim,) = transactions(conn)
    vid = victim["id"]
    before_first = [f"'={vid}|'", f"'={vid}|' || current_setting('threadline.context')", "'garbage'"]
    between = ["''", f"'={vid}|' || current_setting('threadline.context')", "'=999999|'", "'garbage'"]
    n = 1
    for forged in before_first:
        n += 1
        with threadline.context(actor=f"user:{n}"), threadline.transaction(conn):
            conn.execute(f"SELECT set_config('{marker}', {forged}, true)")
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [n])
            conn.execute("UPDATE app.posts SET title = 'x' WHERE id = %s", [n])
    for forged in between:
        n += 1
        with threadline.context(actor=f"user:{n}"), threadline.transaction(conn):
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [n])
            conn.execute(f"SELECT set_config('{marker}', {forged}, true)")
            conn.execute("UPDATE app.posts SET title = 'x' WHERE id = %s", [n])
            conn.execute("UPDATE app.posts SET title = 'y' WHERE id = %s", [n])
    n += 1
    with threadline.context(actor=f"user:{n}"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [n])
        conn.execute(f"RESET {marker}")
        conn.execute("DELETE FROM app.posts WHERE id = %s", [n])
    txs = transactions(conn)
    assert len(txs) == n and len({t["xid"] for t in txs}) == n  # one row per database transaction
    by_id = {t["id"]: t for t in txs}
    per_tx: dict[int, list[str]] = {}
    for row in changes(conn)[1:]:
        assert row["transaction_id"] != vid
        assert by_id[row["transaction_id"]]["actor"] == {"type": "user", "id": str(row["pk"]["id"])}
        per_tx.setdefault(row["transaction_id"], []).append(row["op"])
    assert sorted(per_tx.values()) == sorted(
        [["insert", "update"]] * len(before_first)
        + [["insert", "update", "update"]] * len(between)
        + [["insert", "delete"]]
    )


def test_a_transaction_without_context_has_one_row(conn: Conn, posts: str) -> None:
    with conn.transaction():
        for i in range(1, 4):
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
    (tx,) = transactions(conn)
    assert tx["actor"] is None and tx["context_error"] is None
    assert [r["transaction_id"] for r in changes(conn)] == [tx["id"]] * 3


def test_a_first_write_rolled_back_to_a_savepoint_leaves_one_row(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:7"), threadline.transaction(conn):
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO app.posts (id) VALUES (1)")
            conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        conn.execute("INSERT INTO app.posts (id) VALUES (2)")
        conn.execute("UPDATE app.posts SET title = 'x' WHERE id = 2")
    (tx,) = transactions(conn)
    assert tx["actor"] == {"type": "user", "id": "7"}
    assert [(r["op"], r["transaction_id"]) for r in changes(conn)] == [
        ("insert", tx["id"]),
        ("update", tx["id"]),
    ]


def test_composite_keys_and_primary_key_changes(conn: Conn) -> None:
    conn.execute(
        "CREATE TABLE app.lines (order_id int, line_no int, qty int, PRIMARY KEY (order_id, line_no) DEFERRABLE)"
    )
    ddl.track(conn, "lines")
    conn.execute("INSERT INTO app.lines VALUES (1, 1, 5), (1, 2, 6)")
    # swap the two keys in one statement: pairing by key would mix the rows up
    conn.execute("UPDATE app.lines SET line_no = 3 - line_no")
    rows = [r for r in changes(conn) if r["op"] == "update"]
    got = sorted(((changed_before(r), r["after"]) for r in rows), key=repr)
    assert got == [
        ({"line_no": 1}, {"order_id": 1, "line_no": 2, "qty": 5}),
        ({"line_no": 2}, {"order_id": 1, "line_no": 1, "qty": 6}),
    ]
    assert all(r["pk"] == {"order_id": 1, "line_no": r["after"]["line_no"]} for r in rows)


def test_bulk_statement_pairs_every_row(conn: Conn) -> None:
    # columns named like the aliases a careless generator would use
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY, n int, o int, t int, label text)")
    conn.execute("INSERT INTO app.big SELECT g, g, 0, 0, 'x' || g FROM generate_series(1, 5000) g")
    ddl.track(conn, "big")
    conn.execute("UPDATE app.big SET n = n * 2, id = id + 100000 WHERE id % 2 = 0")
    rows = changes(conn)
    assert len(rows) == 2500
    for r in rows:
        old_id = r["before"]["id"]
        assert r["after"]["id"] == old_id + 100000
        assert r["before"]["n"] == old_id and r["after"]["n"] == old_id * 2
        assert r["after"]["label"] == f"x{old_id}" and sorted(r["changed_fields"]) == ["id", "n"]
    with pytest.raises(InvalidTrackOption, match="reserved"):
        conn.execute('ALTER TABLE app.big ADD COLUMN "threadline new" int')
        ddl.track(conn, "big")


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_columns_named_like_the_triggers_variables(conn: Conn, masked: bool) -> None:
    # typed code reads the table's names from the trigger's variables beside the table's columns
    conn.execute(
        "CREATE TABLE app.named (id int PRIMARY KEY, tg_table_name text, tg_table_schema text,"
        " tg_op text, tx int, raw text, j int, n int)"
    )
    ddl.track(conn, "named", mask=["raw"] if masked else None)
    conn.execute(
        "INSERT INTO app.named VALUES (1, 'a', 'b', 'c', 1, 'r', 2, 3), (2, 'a', 'b', 'c', 1, 'r', 2, 3)"
    )
    conn.execute("UPDATE app.named SET tg_table_name = 'z' WHERE id = 1")
    conn.execute("UPDATE app.named SET tx = tx + 1")
    conn.execute("DELETE FROM app.named WHERE id = 2")
    rows = changes(conn)
    assert [(r["table_schema"], r["table_name"], r["op"]) for r in rows] == [
        ("app", "named", "insert"), ("app", "named", "insert"), ("app", "named", "update"),
        ("app", "named", "update"), ("app", "named", "update"), ("app", "named", "delete"),
    ]  # fmt: skip
    assert rows[2]["after"]["tg_table_name"] == "z" and rows[0]["after"]["tg_table_schema"] == "b"


def test_hostile_identifiers_mixed_case_and_other_schemas(conn: Conn) -> None:
    conn.execute('CREATE SCHEMA "Odd Schema"')
    conn.execute(
        'CREATE TABLE "Odd Schema"."we""ird; drop" ("Id" int PRIMARY KEY, "x$threadline$y" text, '
        '"it\'s" text, "CamelCol" int)'
    )
    try:
        plan = ddl.track(conn, 'we"ird; drop', table_schema="Odd Schema", mask=["it's"])
        statement = ddl.track_sql('"Odd Schema"."we""ird; drop"', mask=["it's"])
        assert conn.execute(statement).fetchone()[2] == "unchanged"  # type: ignore[index]
        (generated,) = conn.execute(
            "SELECT (threadline.render_capture(relid, function_name, keys, exclude, mask, mode = 'typed')).ddl"
            "  FROM threadline.tracked_tables WHERE table_schema = 'Odd Schema'"
        ).fetchone()  # type: ignore[misc]
        assert "$threadline1$" in generated  # the body contains $threadline$, so the tag moved on
        conn.execute('INSERT INTO "Odd Schema"."we""ird; drop" VALUES (1, \'$threadline$\', \'s\', 3)')
        conn.execute('UPDATE "Odd Schema"."we""ird; drop" SET "CamelCol" = 4, "x$threadline$y" = \'q\'')
        ins, upd = changes(conn)
        assert (ins["table_schema"], ins["table_name"]) == ("Odd Schema", 'we"ird; drop')
        assert ins["pk"] == {"Id": 1} and ins["after"]["it's"] == "[masked]"
        assert sorted(upd["changed_fields"]) == ["CamelCol", "x$threadline$y"]
        assert plan.keys == ("Id",)
        assert ddl.untrack(conn, '"Odd Schema"."we""ird; drop"')
    finally:
        conn.execute('DROP SCHEMA "Odd Schema" CASCADE')


def test_types_without_equality_and_partitioned_tables(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.docs (id int PRIMARY KEY, j json, p point, tags json[], r int4range)")
    ddl.track(conn, "docs")
    conn.execute("""INSERT INTO app.docs VALUES (1, '{"a":1}', '(1,2)', ARRAY['{}'::json], '[1,5)')""")
    conn.execute("""UPDATE app.docs SET j = '{"a":2}'""")
    conn.execute("""UPDATE app.docs SET p = '(1,2)'""")  # same value: not recorded
    assert [r["changed_fields"] for r in changes(conn)] == [None, ["j"]]

    conn.execute("CREATE TABLE app.events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)")
    conn.execute(
        "CREATE TABLE app.events_a PARTITION OF app.events FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')"
    )
    conn.execute(
        "CREATE TABLE app.events_b PARTITION OF app.events FOR VALUES FROM ('2021-01-01') TO ('2022-01-01')"
    )
    ddl.track(conn, "events")
    conn.execute("INSERT INTO app.events VALUES (1, '2020-06-01')")
    conn.execute("UPDATE app.events SET at = '2021-06-01'")  # moves the row to another partition
    ev = [r for r in changes(conn) if r["table_name"] == "events"]
    assert [r["op"] for r in ev] == ["insert", "update"]
    assert changed_before(ev[1]) == {"at": "2020-06-01"} and ev[1]["pk"] == {"id": 1, "at": "2021-06-01"}


def test_tracking_refuses_bad_requests_with_clear_errors(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.nokey (a int, b int)")
    conn.execute("CREATE TABLE app.ok (id int PRIMARY KEY, a int, b int)")
    conn.execute("CREATE VIEW app.v AS SELECT 1 AS x")
    with pytest.raises(UnknownTable, match="does not exist"):
        ddl.track(conn, "app.missing")
    with pytest.raises(UnknownTable, match="not a table"):
        ddl.track(conn, "app.v")
    with pytest.raises(NoPrimaryKey, match=r"no primary key.*keys"):
        ddl.track(conn, "app.nokey")
    with pytest.raises(InvalidTrackOption, match="audit"):
        ddl.track(conn, "threadline.changes")
    with pytest.raises(InvalidTrackOption, match="both to exclude and to mask"):
        ddl.track(conn, "app.ok", exclude=["a"], mask=["a"])
    with pytest.raises(UnknownColumn, match="zz not found"):
        ddl.track(conn, "app.ok", exclude=["zz"])
    with pytest.raises(UnknownColumn):
        ddl.track(conn, "app.nokey", keys=["nope"])
    with pytest.raises(InvalidTrackOption, match="key column"):
        ddl.track(conn, "app.ok", exclude=["id"])
    plan = ddl.track(conn, "app.nokey", keys="a")
    assert plan.keys == ("a",)
    conn.execute("INSERT INTO app.nokey VALUES (7, 8)")
    assert changes(conn)[0]["pk"] == {"a": 7}


def _tracked_here(conn: Conn) -> list[Any]:
    """The tracked tables of this module's schema (other modules share the session's database)."""
    return [t for t in ddl.tracked_tables(conn) if t.table_schema == "app"]


def test_track_is_deterministic_idempotent_and_follows_new_columns(conn: Conn, posts: str) -> None:
    first = ddl.track_sql(posts, mask=["body"])
    assert ddl.track_sql(posts, mask=["body"]) == first
    assert first.startswith('SELECT * FROM "threadline".track(')
    assert ddl.track(conn, posts).action == "unchanged"  # again: same code, no duplicates
    n = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.posts'::regclass AND NOT tgisinternal"
    ).fetchone()
    assert n == (4,)
    (tracked,) = _tracked_here(conn)
    assert tracked.current and tracked.keys == ("id",) and tracked.mode == "typed"
    # the DDL event trigger regenerates the code in the ALTER's own transaction
    conn.execute("ALTER TABLE app.posts ADD COLUMN extra int")
    assert _tracked_here(conn)[0].current
    conn.execute("UPDATE app.posts SET extra = 1")  # no rows yet: nothing recorded, nothing fails
    conn.execute("INSERT INTO app.posts (id, extra) VALUES (1, 1)")
    conn.execute("UPDATE app.posts SET extra = 2")
    assert changes(conn)[-1]["changed_fields"] == ["extra"]


def test_untrack_removes_capture_and_keeps_history(conn: Conn, posts: str) -> None:
    conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    assert ddl.untrack(conn, posts)
    assert not ddl.untrack(conn, posts)
    conn.execute("INSERT INTO app.posts (id) VALUES (2)")
    assert len(changes(conn)) == 1
    assert _tracked_here(conn) == []


def test_install_upgrades_an_older_schema_in_place_keeping_its_rows(conn: Conn) -> None:
    # what version 2 created: changes keyed by id with a separate transaction_id index
    conn.execute(
        """
        CREATE SCHEMA audit_up;
        CREATE TABLE audit_up.schema_version (version integer PRIMARY KEY, installed_at timestamptz DEFAULT now());
        INSERT INTO audit_up.schema_version VALUES (2);
        CREATE TABLE audit_up.changes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, transaction_id bigint NOT NULL,
            table_schema text NOT NULL, table_name text NOT NULL,
            op text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')), pk jsonb,
            after jsonb, before jsonb, changed_fields text[],
            captured_at timestamptz NOT NULL DEFAULT clock_timestamp());
        CREATE INDEX changes_transaction_id_idx ON audit_up.changes (transaction_id);
        INSERT INTO audit_up.changes (transaction_id, table_schema, table_name, op) VALUES (7, 'a', 'b', 'insert');
        """
    )
    try:
        result = ddl.install(conn, "audit_up")
        assert (result.previous_version, result.version) == (2, ddl.SCHEMA_VERSION)
        key = conn.execute(
            """SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c
                CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
               WHERE c.conrelid = 'audit_up.changes'::regclass AND c.contype = 'p'"""
        ).fetchone()
        assert key == (["transaction_id", "id"],)
        assert conn.execute("SELECT to_regclass('audit_up.changes_transaction_id_idx')").fetchone() == (None,)
        # the check on op (rebuilt by PostgreSQL for every captured statement) is gone since version 6
        checks = "SELECT count(*) FROM pg_constraint WHERE conrelid = 'audit_up.changes'::regclass AND contype = 'c'"
        assert conn.execute(checks).fetchone() == (0,)
        assert conn.execute("SELECT transaction_id, op FROM audit_up.changes").fetchall() == [(7, "insert")]
        assert not ddl.install(conn, "audit_up").changed
    finally:
        conn.execute("DROP SCHEMA audit_up CASCADE")


def test_install_replaces_the_hash_index_of_an_earlier_build_of_this_version(conn: Conn, posts: str) -> None:
    # an earlier build of the current version found a row's changes through a hash index on pk
    # (and its script left no comment naming it)
    conn.execute("COMMENT ON TABLE threadline.schema_version IS NULL")
    conn.execute("DROP INDEX threadline.changes_key_idx")
    conn.execute("CREATE INDEX changes_row_idx ON threadline.changes USING hash (pk)")
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'kept')")
    assert [c.op for c in threadline.history(conn, "app.posts", 1)] == ["insert"]  # read through it
    result = ddl.install(conn)
    assert result.previous_version == result.version == ddl.SCHEMA_VERSION
    assert key_indexes(conn) == ["changes_key_idx btree"]
    assert [c.after["title"] for c in threadline.history(conn, "app.posts", 1)] == ["kept"]


def test_install_brings_a_store_of_an_earlier_build_of_this_version_up_to_date(
    conn: Conn, posts: str
) -> None:
    # an earlier build of the current version: other function bodies and capture code, and the
    # comment its script left; its version number is this build's
    (fn,) = (
        conn.execute(
            "SELECT function_name FROM threadline.tracked_tables WHERE table_schema = 'app' AND table_name = 'posts'"
        ).fetchone()
        or ()
    )
    conn.execute(
        "CREATE OR REPLACE FUNCTION threadline.insert_transaction_row() RETURNS bigint LANGUAGE sql AS"
        " $$ INSERT INTO threadline.transactions (context_error) VALUES ('earlier build') RETURNING id $$"
    )
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION threadline.{}() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RETURN NULL; END $$"
        ).format(sql.Identifier(fn))
    )
    conn.execute("UPDATE threadline.tracked_tables SET fingerprint = 'earlier build'")
    conn.execute(
        "COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0123456789abcdef'"
    )
    result = ddl.install(conn)
    assert result.previous_version == result.version == ddl.SCHEMA_VERSION and result.refreshed
    with threadline.context(actor="user:7", correlation_id="req-build"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'current')")
    (change,) = changes(conn)
    assert change["after"]["title"] == "current" and change["context_error"] is None
    assert change["actor"] == {"type": "user", "id": "7"} and change["correlation_id"] == "req-build"
    # a store the current build wrote is left alone: a function changed by hand stays changed
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION threadline.{}() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RETURN NULL; END $$"
        ).format(sql.Identifier(fn))
    )
    assert not ddl.install(conn).changed
    conn.execute("INSERT INTO app.posts (id, title) VALUES (2, 'not captured')")
    assert len(changes(conn)) == 1


def test_a_refresh_waits_for_a_writer_a_bounded_time_and_changes_nothing_when_it_gives_up(
    conn: Conn, dsn: str, posts: str
) -> None:
    comment = "SELECT obj_description('threadline.schema_version'::regclass, 'pg_class')"
    conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0000'")
    with psycopg.connect(dsn) as writer:  # a transaction that wrote a tracked table and is still open
        writer.execute("INSERT INTO app.posts (id, title) VALUES (1, 'open')")
        started = time.monotonic()
        with pytest.raises(threadline.core.errors.SchemaError, match=r"stayed busy.*nothing was changed"):
            ddl.install(conn, lock_timeout=0.2, attempts=2)
        assert time.monotonic() - started < 5
        assert conn.execute(comment).fetchone() == ("threadline audit schema 7, script 0000",)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)  # the session's own setting is kept
        # the writer ends while install is still trying: it goes through
        timer = threading.Timer(0.5, writer.commit)
        timer.start()
        try:
            assert ddl.install(conn, lock_timeout=0.2, attempts=6).refreshed
        finally:
            timer.join()
    assert conn.execute(comment).fetchone() != ("threadline audit schema 7, script 0000",)
    assert [c["after"]["title"] for c in changes(conn)] == ["open"]


@pytest.mark.parametrize(
    "options",
    [{"lock_timeout": 0}, {"lock_timeout": True}, {"lock_timeout": "2s"}, {"attempts": 0}, {"attempts": 1.5}],
)
def test_install_refuses_a_lock_timeout_or_attempts_that_make_no_sense(
    conn: Conn, options: dict[str, Any]
) -> None:
    with pytest.raises(threadline.core.errors.ConfigurationError, match=r"lock_timeout|attempts"):
        ddl.install(conn, **options)


def test_capture_functions_of_older_versions_keep_one_row_per_transaction(conn: Conn) -> None:
    # versions 2 and 3 generated functions that call current_transaction_id() in every statement
    conn.execute("CREATE TABLE app.old (id int PRIMARY KEY)")
    conn.execute(
        """
        CREATE FUNCTION app.old_capture() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk)
          SELECT (SELECT threadline.current_transaction_id()), 'app', 'old', 'insert', jsonb_build_object('id', n.id)
            FROM new_rows n;
          RETURN NULL;
        END $$;
        CREATE TRIGGER old_capture AFTER INSERT ON app.old REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION app.old_capture();
        """
    )
    with threadline.context(actor="user:1"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.old VALUES (1)")
        conn.execute("INSERT INTO app.old VALUES (2)")
    assert len(transactions(conn)) == 1 and len({r["transaction_id"] for r in changes(conn)}) == 1


@pytest.mark.parametrize(
    "raw",
    [
        '{"v":1,"correlation_id":"a\\u0085b"}',
        '{"v":1,"request_id":"abc\\u202edef"}',
        '{"v":1,"causation_id":"\\u2069x"}',
        '{"v":1,"actor":{"type":"user","id":"1\\u202a"}}',
    ],
)
def test_the_database_refuses_c1_and_bidi_controls_in_ids(conn: Conn, raw: str) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('threadline.context', %s, true)", [raw])
        tx = conn.execute("SELECT threadline.transaction_row()").fetchone()
        row = conn.execute(
            "SELECT actor, correlation_id, request_id, context_error FROM threadline.transactions WHERE id = %s",
            tx,
        ).fetchone()
    assert row is not None and row[:3] == (None, None, None)
    assert row[3] in ("context has an invalid id or origin", "context actor is invalid")


def test_context_parsing_catches_only_the_errors_of_unacceptable_json(conn: Conn, posts: str) -> None:
    # the exception block around the jsonb cast names the conditions a bad text raises; an
    # unexpected error (say, out of memory) must surface instead of being recorded as bad JSON.
    # The capture code holds the usual context's path inline, exception block included.
    (capture,) = (
        conn.execute(
            "SELECT function_name FROM threadline.tracked_tables WHERE table_schema = 'app' AND table_name = 'posts'"
        ).fetchone()
        or ()
    )
    for fn in ("insert_transaction_row(bigint)", "parse_context(text)", f"{capture}()"):
        (src,) = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)", [f"threadline.{fn}"]
        ).fetchone()  # type: ignore[misc]
        assert "WHEN others" not in src, fn
        assert "invalid_text_representation" in src and "untranslatable_character" in src, fn


def test_generated_contexts_decode_as_decode_context_does(conn: Conn, posts: str) -> None:
    # contexts assembled at random from valid and invalid pieces: the first check (short, no
    # backslash) must never accept what the complete checks refuse, nor store other fields
    rnd = random.Random(7)
    texts = ["c", "", "a b", "é✓", "a\u0085b", "a\u202eb", 'q"q', "x" * 40, "a\\b"]
    values: list[Any] = [*texts, 1, 1.0, None, True, [], ["c"], {}, {"k": "v"}]
    actors: list[Any] = [
        {"type": "user", "id": "42"},
        {"type": "anonymous"},
        {"type": "user"},
        {"type": "User", "id": "1"},
        {"type": "user", "id": "1", "display": "D"},
        {"type": "user", "id": 1},
        {"type": "user", "id": "1", "extra": 1},
        "user:1",
        [],
    ]
    for _ in range(400):
        ctx: dict[str, Any] = {"v": rnd.choice([1, 1, 1, 1.0, 2, "1", [1]])}
        for name in ("correlation_id", "request_id", "causation_id", "origin", "incoming_error"):
            if rnd.random() < 0.3:
                ctx[name] = rnd.choice(values)
        for name in ("job", "meta"):
            if rnd.random() < 0.2:
                ctx[name] = rnd.choice([{}, {"id": "t"}, [], "j", {"n": [1, {"k": None}]}])
        if rnd.random() < 0.6:
            ctx["actor"] = rnd.choice(actors)
        if rnd.random() < 0.05:
            ctx["unknown"] = 1
        raw = json.dumps(ctx, ensure_ascii=rnd.random() < 0.3, separators=(",", ":"))
        stored, decoded = _stored_and_decoded(conn, raw)
        assert stored == decoded, raw


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
@pytest.mark.parametrize("mask", [False, True], ids=["plain", "masked"])
def test_tables_of_many_columns_are_captured(conn: Conn, typed: bool, mask: bool) -> None:
    # a function takes at most 100 arguments: the capture code must not pass one per column
    columns = ", ".join(f"c{i} int" for i in range(1, 150))
    conn.execute(f"CREATE TABLE app.wide (id int PRIMARY KEY, {columns})")
    conn.execute("INSERT INTO app.wide (id) SELECT generate_series(1, 3)")
    ddl.track(conn, "app.wide", mask=["c7"] if mask else None)
    if not typed:
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'wide'"
        )
    with threadline.context(actor="user:3"), threadline.transaction(conn):
        conn.execute("UPDATE app.wide SET c1 = id, c149 = 2")  # several rows
        conn.execute("UPDATE app.wide SET c2 = 5 WHERE id = 1")  # one row
        conn.execute(
            f"UPDATE app.wide SET ({', '.join(f'c{i}' for i in range(1, 150))}) = ROW({', '.join('8' for _ in range(149))})"
        )
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["update"] * 7
    assert [sorted(r["changed_fields"]) for r in rows[:3]] == [["c1", "c149"]] * 3
    assert rows[3]["changed_fields"] == ["c2"] and changed_before(rows[3]) == {"c2": None}
    assert len(rows[4]["changed_fields"]) == 149
    assert all(r["after"]["c149"] == 8 for r in rows[4:])
    first = {r["pk"]["id"]: r for r in rows[4:]}[1]
    assert changed_before(first)["c2"] == 5 and changed_before(first)["c149"] == 2


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_floats_are_compared_and_recorded_exactly_whatever_the_session_prints(
    conn: Conn, typed: bool
) -> None:
    # at extra_float_digits 0 a session prints 1.0000000000000002 as 1: capture must not
    conn.execute("CREATE TABLE app.measures (id int PRIMARY KEY, f float8, p point, r real[])")
    conn.execute("INSERT INTO app.measures VALUES (1, 1.0, '(1,1)', '{1}'), (2, 1.0, '(1,1)', '{1}')")
    ddl.track(conn, "app.measures")
    if not typed:
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'measures'"
        )
    conn.execute("SET extra_float_digits = 0")
    try:
        with threadline.context(actor="user:3"), threadline.transaction(conn):
            conn.execute("UPDATE app.measures SET f = 1.0000000000000002 WHERE id = 1")  # one row
            conn.execute(
                "UPDATE app.measures SET p = '(1,1.0000000000000002)', r = '{1.0000001}'"
            )  # rows paired
        rows = changes(conn)
    finally:
        conn.execute("RESET extra_float_digits")
    assert [r["op"] for r in rows] == ["update"] * 3
    assert rows[0]["changed_fields"] == ["f"] and rows[0]["after"]["f"] == 1.0000000000000002
    assert [sorted(r["changed_fields"]) for r in rows[1:]] == [["p", "r"], ["p", "r"]]
    assert {r["after"]["p"] for r in rows[1:]} == {"(1,1.0000000000000002)"}
    assert [r["after"]["r"] for r in rows[1:]] == [[1.0000001], [1.0000001]]


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
@pytest.mark.parametrize("mask", [False, True], ids=["plain", "masked"])
def test_json_values_jsonb_cannot_hold_never_fail_the_write(conn: Conn, typed: bool, mask: bool) -> None:
    # the json type keeps a \u0000 escape and any number; jsonb refuses both, and so do the json
    # functions for the escape: capture must still record every change, and never show the mask
    conn.execute("CREATE TABLE app.docs (id int PRIMARY KEY, body json, secret text)")
    ddl.track(conn, "app.docs", mask=["secret"] if mask else None)
    if not typed:
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'docs'"
        )
    nul, huge, both = '{"s":"\\u0000"}', '{"n":1e1000000}', '{"s":"\\\\u0000 \\u0000"}'
    with threadline.context(actor="user:3"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.docs VALUES (1, %s, 's1')", [nul])
        conn.execute("INSERT INTO app.docs VALUES (2, %s, 's2'), (3, %s, 's3')", [huge, both])
        conn.execute("UPDATE app.docs SET secret = secret || 'x'")  # rows paired
        conn.execute("UPDATE app.docs SET secret = 'y' WHERE id = 2")  # one row
        conn.execute("DELETE FROM app.docs WHERE id < 3")
    rows = changes(conn)
    assert [(r["op"], r["pk"]) for r in rows] == [
        ("insert", {"id": 1}), ("insert", {"id": 2}), ("insert", {"id": 3}),
        ("update", {"id": 1}), ("update", {"id": 2}), ("update", {"id": 3}), ("update", {"id": 2}),
        ("delete", {"id": 1}), ("delete", {"id": 2}),
    ]  # fmt: skip
    assert all(r["changed_fields"] == ["secret"] for r in rows[3:7])
    if mask:
        images = repr([(r["before"], r["after"]) for r in rows])
        assert "s1" not in images and "s2" not in images and "'y'" not in images, images
    else:
        assert rows[6]["after"]["secret"] == "y" and changed_before(rows[6]) == {"secret": "s2x"}
    if typed or not mask:  # the image keeps the json as written
        assert rows[0]["after"]["body"] == {"s": "\x00"}
        assert rows[1]["after"]["body"] == {"n": float("inf")}
    else:  # read through jsonb: the escape as text, the number as its JSON text
        assert rows[0]["after"]["body"] == {"s": "\\u0000"}
        assert rows[1]["after"]["body"] == '{"n":1e1000000}'


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
@pytest.mark.parametrize("mask", [False, True], ids=["plain", "masked"])
def test_a_json_value_written_differently_is_an_update(conn: Conn, typed: bool, mask: bool) -> None:
    # jsonb writes these pairs alike (key order, spaces, escapes, number spellings): the json
    # column's text changed all the same, and every code shape records the update
    conn.execute("CREATE TABLE app.spelled (id int PRIMARY KEY, body json, secret text)")
    pairs = [
        ('{"a":1,"b":2}', '{"b":2,"a":1}'), ("[1, 2]", "[1,2]"), ('"\\u00e9"', '"é"'), ("100", "1e2"),
        ('{"a":1,"a":2}', '{"a":2}'),
    ]  # fmt: skip
    conn.execute(
        "INSERT INTO app.spelled SELECT i, v::json, 's' FROM unnest(%s::text[]) WITH ORDINALITY AS x(v, i)",
        [[old for old, _ in pairs]],
    )
    ddl.track(conn, "app.spelled", mask=["secret"] if mask else None)
    if not typed:
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = 'spelled'"
        )
    for i, (_, new) in enumerate(pairs, start=1):
        conn.execute("UPDATE app.spelled SET body = %s::json WHERE id = %s", [new, i])  # one row
    conn.execute("UPDATE app.spelled SET body = (body::text || ' ')::json")  # every row: only a space
    conn.execute("UPDATE app.spelled SET body = %s::json, secret = 't' WHERE id = 1", ['{"a":1, "b":2}'])
    rows = changes(conn)
    assert [(r["op"], r["pk"]["id"]) for r in rows[: len(pairs)]] == [("update", i) for i in range(1, 6)]
    assert all(r["changed_fields"] == ["body"] for r in rows[: len(pairs)])
    assert [r["after"]["body"] for r in rows[: len(pairs)]] == [{"a": 1, "b": 2}, [1, 2], "é", 100, {"a": 2}]
    # only the space after the value: an update too (readers name no changed field for it)
    assert len(rows) == 2 * len(pairs) + 1
    assert sorted(rows[-1]["changed_fields"]) == ["body", "secret"]


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_a_column_hidden_in_one_table_of_an_inheritance_tree_is_hidden_in_all(
    conn: Conn, typed: bool
) -> None:
    # A statement on a parent is captured by the parent's code alone, with its children's rows.
    conn.execute(
        """
        CREATE TABLE app.people (id int PRIMARY KEY, kind text, ssn_note text);
        CREATE TABLE app.patients (diagnosis text) INHERITS (app.people);
        ALTER TABLE app.patients ADD PRIMARY KEY (id);
        CREATE TABLE app.staff (badge text) INHERITS (app.people);
        ALTER TABLE app.staff ADD PRIMARY KEY (id);
        """
    )
    ddl.track(conn, "app.people")
    ddl.track(conn, "app.patients", mask=["ssn_note", "diagnosis"])
    ddl.track(conn, "app.staff", exclude=["badge"])
    if not typed:
        conn.execute("SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables")
    conn.execute("INSERT INTO app.patients VALUES (7, 'patient', 'SSN-123', 'flu')")
    conn.execute("INSERT INTO app.people VALUES (8, 'visitor', 'SSN-456')")
    conn.execute("UPDATE app.people SET ssn_note = 'SSN-999' WHERE id IN (7, 8)")  # through the parent
    conn.execute("DELETE FROM app.people WHERE id IN (7, 8)")
    rows = changes(conn)
    assert [(r["table_name"], r["op"]) for r in rows] == [
        ("patients", "insert"), ("people", "insert"), ("people", "update"), ("people", "update"),
        ("people", "delete"), ("people", "delete"),
    ]  # fmt: skip
    assert "SSN-" not in repr(rows) and "flu" not in repr(rows)
    assert all(r["after"] is None or r["after"]["ssn_note"] == "[masked]" for r in rows)
    (status,) = conn.execute(
        "SELECT array_agg(DISTINCT status) FROM threadline.tracking_status()"
    ).fetchone() or (None,)
    assert status == ["installed"]
    conn.execute("INSERT INTO app.patients VALUES (11, 'patient', 'SSN-321', 'cough')")
    threadline.take_baseline(conn, "app.people")  # its snapshots mask what its relatives hide
    assert "SSN-321" not in repr(changes(conn))
    # a table that inherits a tracked one later takes the masks it shares
    conn.execute("CREATE TABLE app.guests (id int PRIMARY KEY, kind text, ssn_note text, diagnosis text)")
    ddl.track(conn, "app.guests")
    try:
        with conn.transaction():
            conn.execute("ALTER TABLE app.guests INHERIT app.patients")  # followed by the event triggers
    except psycopg.errors.FeatureNotSupported:
        # PostgreSQL 16 and later refuse a table with transition-table triggers as a new child
        ddl.untrack(conn, "app.guests")
        conn.execute("ALTER TABLE app.guests INHERIT app.patients")
        ddl.track(conn, "app.guests")
    conn.execute("INSERT INTO app.guests VALUES (9, 'guest', 'SSN-777', 'cold')")
    assert "SSN-777" not in repr(changes(conn))
    # untracked, a table no longer hides its columns in its relatives
    ddl.untrack(conn, "app.guests")
    ddl.untrack(conn, "app.patients")
    conn.execute("INSERT INTO app.people VALUES (10, 'visitor', 'open')")
    assert changes(conn)[-1]["after"]["ssn_note"] == "open"
