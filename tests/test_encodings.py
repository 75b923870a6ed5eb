"""A database in another encoding than UTF-8: the audit schema installs, and a context holding a
character the database cannot hold never fails the application's write."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ActorRef

from .conftest import ADMIN_DSN, _dsn_for, store_database


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1251"])
def test_a_store_in_another_encoding_records_every_write(encoding: str) -> None:
    for dsn in store_database(None, prefix="threadline_encoding", encoding=encoding):
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW server_encoding").fetchone() == (encoding,)
            for i, actor in enumerate(["plain", "élodie", "علي", "Илья"], start=1):
                with (
                    threadline.context(actor=ActorRef.user(actor), correlation_id=f"req-{i}"),
                    threadline.transaction(conn),
                ):
                    conn.execute("INSERT INTO items VALUES (%s, 'v')", [i])
            rows = conn.execute(
                "SELECT c.pk ->> 'id', t.correlation_id, t.actor ->> 'id', t.context_error"
                "  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id"
                " ORDER BY c.id"
            ).fetchall()
    # a character the database holds is kept; one it cannot hold makes the context invalid:
    # recorded as such, never trusted, never a failed write
    invalid = (None, None, "context is not valid JSON")
    assert rows[0] == ("1", "req-1", "plain", None)
    assert rows[1] == (("2", "req-2", "élodie", None) if encoding == "LATIN1" else ("2", *invalid))
    assert rows[2] == ("3", *invalid)
    assert rows[3] == (("4", "req-4", "Илья", None) if encoding == "WIN1251" else ("4", *invalid))


def test_automatic_mode_in_another_encoding_never_fails_the_write() -> None:
    # ThreadlineConnection (what the Django and SQLAlchemy bridges make of their connections), in a
    # transaction and in autocommit mode, binding server-side and client-side: an actor the
    # database cannot hold makes the context invalid, recorded as such, never a failed write
    modes = list(itertools.product([False, True], [psycopg.Cursor, psycopg.ClientCursor]))
    for dsn in store_database(None, prefix="threadline_encoding", encoding="LATIN1"):
        for i, (autocommit, cursor_factory) in enumerate(modes, start=1):
            with (
                threadline.ThreadlineConnection.connect(
                    dsn, autocommit=autocommit, cursor_factory=cursor_factory
                ) as conn,
                threadline.context(actor=ActorRef.user("علي"), correlation_id=f"req-{i}"),
            ):
                conn.execute("INSERT INTO items VALUES (%s, 'v')", [i])
                conn.execute("UPDATE items SET v = 'w' WHERE id = %s", [i])
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT c.pk ->> 'id', t.actor, t.context_error"
                "  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id"
                " ORDER BY c.id"
            ).fetchall()
    assert [row[0] for row in rows] == [str(i) for i, _ in enumerate(modes, start=1) for _ in "iu"]
    assert {row[1:] for row in rows} == {(None, "context is not valid JSON")}


def test_a_sql_ascii_database_records_every_write() -> None:
    # SQL_ASCII has no encoding to convert a \u escape into: over a connection in SQL_ASCII (the
    # default there) the bridges send characters beyond ASCII as such escapes, and the context is
    # recorded as invalid; over one in UTF8 the bytes are stored as sent
    name = f"threadline_ascii_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    dsn = _dsn_for(name)
    try:
        with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as conn:
            threadline.ddl.install(conn, partition_by=None)
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
            threadline.ddl.track(conn, "items")
        for i, client_encoding in enumerate(["SQL_ASCII", "UTF8"], start=1):
            with (
                psycopg.connect(dsn, autocommit=True, client_encoding=client_encoding) as conn,
                threadline.context(actor=ActorRef.user("élodie"), correlation_id=f"req-{i}"),
                threadline.transaction(conn),
            ):
                conn.execute("INSERT INTO items VALUES (%s, 'v')", [i])
        with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as conn:
            stored = conn.execute(
                "SELECT c.pk ->> 'id', t.correlation_id, t.actor ->> 'id', t.context_error"
                "  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id"
                " ORDER BY c.id"
            ).fetchall()
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    assert stored == [("1", None, None, "context is not valid JSON"), ("2", "req-2", "élodie", None)]


# json texts the json type stores as written, which jsonb, PostgreSQL's JSON functions or the
# database's encoding may refuse: escapes of a character beyond ASCII, of NUL, of a whole surrogate
# pair and of either half alone (in a key too), and a number beyond numeric's range
JSON_VALUES = [
    '{"s":"\\u00e9"}', '{"s":"\\u0000"}', '{"n":1e1000000}', '{"s":"\\ud83d\\ude00"}',
    '{"s":"\\ud83d"}', '{"s":"\\ude00"}', '{"\\ud83d":1}', '{"s":"\\u0416"}', ' [1e1000000, "\\ud83d"] ',
]  # fmt: skip


@pytest.mark.parametrize("encoding", ["UTF8", "LATIN1", "SQL_ASCII"])
def test_json_values_never_fail_the_write_whatever_the_capture_code(encoding: str) -> None:
    # typed and drift-safe code, with and without a masked column, keyed by id or by the json
    # column itself (a key given with --keys): every write succeeds and is recorded, the mask holds,
    # and a row's key is the same whichever code recorded it
    name = f"threadline_json_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name), sql.Literal(encoding)
            )
        )
    try:
        with psycopg.connect(_dsn_for(name), autocommit=True, client_encoding="UTF8") as conn:
            threadline.ddl.install(conn, partition_by=None)
            tables = []
            for typed, masked, json_key in itertools.product([True, False], repeat=3):
                table = f"t_{'typed' if typed else 'safe'}{'_masked' if masked else ''}{'_jsonkey' if json_key else ''}"
                tables.append(table)
                conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body json, secret text)")
                # rows written before tracking: their first update and delete read old rows
                conn.execute(
                    f"INSERT INTO {table} SELECT 100 + i, v::json, 'hidden' FROM unnest(%s::text[]) WITH ORDINALITY AS x(v, i)",
                    [JSON_VALUES],
                )
                threadline.ddl.track(
                    conn, table, mask=["secret"] if masked else None, keys=["body"] if json_key else None
                )
                if not typed:
                    conn.execute(
                        "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = %s",
                        [table],
                    )
                for i, value in enumerate(JSON_VALUES, start=1):
                    with threadline.context(correlation_id=f"{table}-{i}"), threadline.transaction(conn):
                        conn.execute(f"INSERT INTO {table} VALUES (%s, %s::json, 'hidden')", [i, value])
                        conn.execute(f"UPDATE {table} SET secret = 'hidden2' WHERE id = %s", [100 + i])
                        conn.execute(
                            f"UPDATE {table} SET body = body, secret = 'x' WHERE id IN (%s, %s)", [i, 100 + i]
                        )
                conn.execute(f"UPDATE {table} SET secret = 'hidden3'")
                conn.execute(f"DELETE FROM {table}")
            rows = conn.execute(
                "SELECT table_name, count(*), count(*) FILTER (WHERE op = 'update'),"
                " bool_or(concat(before::text, after::text) LIKE '%%hidden%%'),"
                " array_agg(DISTINCT pk::text ORDER BY pk::text)"
                "  FROM threadline.changes GROUP BY table_name ORDER BY table_name"
            ).fetchall()
            # the readers read them all, with the changed fields
            histories = {
                table: [threadline.history(conn, table, i) for i in range(1, len(JSON_VALUES) + 1)]
                for table in tables
                if "jsonkey" not in table
            }
            pages = {table: len(threadline.timeline(conn, table=table, limit=1000)) for table in tables}
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    n = len(JSON_VALUES)
    by_table = {r[0]: r[1:] for r in rows}
    assert sorted(by_table) == sorted(tables)
    for table, (count, updates, shown, _) in by_table.items():
        assert (count, updates, pages[table]) == (8 * n, 5 * n, 8 * n), table
        assert shown == ("masked" not in table), table
    for table, history in histories.items():
        for changes in history:
            assert [(c.op, c.changed_fields) for c in changes] == [
                ("delete", None), ("update", ("secret",)), ("update", ("secret",)), ("insert", None),
            ], table  # fmt: skip
    id_keys = {tuple(keys) for table, (_, _, _, keys) in by_table.items() if "jsonkey" not in table}
    json_keys = {tuple(keys) for table, (_, _, _, keys) in by_table.items() if "jsonkey" in table}
    assert len(id_keys) == 1 and len(json_keys) == 1, (id_keys, json_keys)
    assert len(next(iter(json_keys))) == n
