"""Concurrent audited writers with distinct contexts; shared by tests/test_load.py and bench/load.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

import threadline
from threadline import ActorRef, ThreadlineConnection

LOAD_DDL = """
DROP SCHEMA IF EXISTS load CASCADE;
CREATE SCHEMA load;
CREATE TABLE load.items (writer int, seq int, value int NOT NULL, PRIMARY KEY (writer, seq));
"""


def setup(dsn: str) -> None:
    """Create and track ``load.items``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LOAD_DDL)
        threadline.ddl.track(conn, "load.items")


def run_writers(dsn: str, writers: int, transactions: int) -> float:
    """``writers`` threads, each committing ``transactions`` transactions (an insert and an update)
    under its own context per transaction (automatic mode). Returns the elapsed seconds."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        try:
            with ThreadlineConnection.connect(dsn, autocommit=True) as conn:
                barrier.wait()
                for seq in range(transactions):
                    with (
                        threadline.context(actor=ActorRef.user(str(w)), correlation_id=f"w{w}-{seq}"),
                        conn.transaction(),
                    ):
                        conn.execute("INSERT INTO load.items VALUES (%s, %s, 0)", [w, seq])
                        conn.execute(
                            "UPDATE load.items SET value = 1 WHERE writer = %s AND seq = %s", [w, seq]
                        )
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise errors[0]
    return elapsed


def check(dsn: str, writers: int, transactions: int) -> dict[str, Any]:
    """Every write accounted for and attributed to its own context; raises AssertionError if not."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT count(*),
                   count(*) FILTER (WHERE t.id IS NULL),
                   count(*) FILTER (WHERE t.correlation_id IS DISTINCT FROM
                                          format('w%s-%s', c.pk->>'writer', c.pk->>'seq')
                                       OR t.actor IS DISTINCT FROM
                                          jsonb_build_object('type', 'user', 'id', c.pk->>'writer')),
                   count(DISTINCT c.transaction_id),
                   count(*) FILTER (WHERE c.op = 'insert'), count(*) FILTER (WHERE c.op = 'update')
              FROM threadline.changes c LEFT JOIN threadline.transactions t ON t.id = c.transaction_id
             WHERE c.table_schema = 'load'
            """
        ).fetchone()
    assert row is not None
    total, orphans, wrong, txs, inserts, updates = row
    expected = writers * transactions
    assert (total, orphans, wrong) == (2 * expected, 0, 0), row
    assert (txs, inserts, updates) == (expected, expected, expected), row
    return {"changes": total, "transactions": txs}
