"""A database in another encoding than UTF-8: the audit schema installs, and a context holding a
character the database cannot hold never fails the application's write."""

from __future__ import annotations

import psycopg
import pytest

import threadline
from threadline import ActorRef

from .conftest import store_database


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
