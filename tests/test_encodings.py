"""A database in another encoding than UTF-8: the audit schema installs, and a context holding a
character the database cannot hold never fails the application's write."""

from __future__ import annotations

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
