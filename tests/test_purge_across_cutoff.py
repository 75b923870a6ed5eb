"""A purge that drops whole partitions, against a transaction still writing into the period it
drops: the period is checked again once the drop's locks are held (the transaction has ended by
then), so a change captured at or after the cut-off is never dropped with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline.ops import partitions
from threadline.ops.retention import PurgeResult, purge

from .conftest import store_database


@pytest.fixture
def daily() -> Iterator[str]:
    """DSN of a fresh database with an audit store partitioned by day and a tracked ``items``."""
    yield from store_database("day", "threadline_parts")


def _split_today(conn: psycopg.Connection[Any], at: datetime) -> str:
    """Cut today's partitions of both tables in two at ``at`` (standing in for midnight, when a
    period ends); returns the name of the earlier ``transactions`` partition."""
    for table in ("transactions", "changes"):
        row = conn.execute(
            "SELECT partition, range_from, range_to FROM threadline.partitions()"
            " WHERE parent = %s AND range_from <= %s AND range_to > %s",
            [table, at, at],
        ).fetchone()
        assert row is not None
        name, lo, hi = row
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("threadline", name)))
        for part, start, end in ((f"{table}_before", lo, at), (f"{table}_after", at, hi)):
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    sql.Identifier("threadline", part),
                    sql.Identifier("threadline", table),
                    sql.Literal(start),
                    sql.Literal(end),
                )
            )
    return "transactions_before"


def _purge_while_open(
    dsn: str, writer: psycopg.Connection[Any], cutoff: datetime
) -> tuple[PurgeResult | None, list[BaseException]]:
    """Run ``purge(cutoff)`` in a thread; once it waits for a lock ``writer`` holds, commit
    ``writer``'s transaction; returns the purge's result."""
    results: list[PurgeResult] = []
    errors: list[BaseException] = []
    purger = psycopg.connect(dsn, autocommit=True)
    pid = purger.info.backend_pid

    def run() -> None:
        try:
            results.append(purge(purger, cutoff))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as watch:
            blocked = False
            for _ in range(2000):  # until the purge waits for the writer (its lock_timeout is 1 s, retried)
                row = watch.execute("SELECT %s = ANY (pg_blocking_pids(%s))", [writer.info.backend_pid, pid])
                if (row.fetchone() or (False,))[0]:
                    blocked = True
                    break
                if not thread.is_alive():
                    break
                time.sleep(0.01)
        assert blocked, f"the purge never waited for the open transaction: {errors or results}"
        writer.commit()
    finally:
        thread.join(120)
        purger.close()
    assert not thread.is_alive()
    return (results[0] if results else None), errors


def test_a_period_whose_open_transaction_writes_after_the_cut_off_is_not_dropped(daily: str) -> None:
    with (
        psycopg.connect(daily, autocommit=True) as conn,
        threadline.ThreadlineConnection.connect(daily) as writer,
        threadline.context(actor="user:1", correlation_id="across"),
    ):
        # the transaction starts in the earlier period, writes, the cut-off falls, it writes again
        started = writer.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        earlier = _split_today(conn, started + timedelta(microseconds=1))
        writer.execute("INSERT INTO items VALUES (1, 'before the cut-off')")
        cutoff = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        writer.execute("INSERT INTO items VALUES (2, 'after the cut-off')")
        result, errors = _purge_while_open(daily, writer, cutoff)
        assert not errors and result is not None, errors
        # the period went to the batched purge: the change captured before the cut-off is gone,
        # the one after it (and its transaction) stays
        assert (result.partitions, result.changes, result.transactions) == (0, 1, 0)
        assert earlier in {p.name for p in partitions.partitions(conn)}
        kept = threadline.history(conn, "items", 2)
        assert [(c.op, c.after) for c in kept] == [("insert", {"id": 2, "v": "after the cut-off"})]
        assert kept[0].captured_at >= cutoff
        assert kept[0].transaction is not None and kept[0].transaction.correlation_id == "across"
        assert threadline.history(conn, "items", 1) == []


def test_a_period_dropped_after_its_open_transaction_ends_counts_what_it_held(daily: str) -> None:
    with psycopg.connect(daily, autocommit=True) as conn, psycopg.connect(daily) as writer:
        started = writer.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        earlier = _split_today(conn, started + timedelta(microseconds=1))
        writer.execute("INSERT INTO items VALUES (1, 'before the cut-off')")
        writer.execute("UPDATE items SET v = 'still before' WHERE id = 1")
        cutoff = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
        result, errors = _purge_while_open(daily, writer, cutoff)
        assert not errors and result is not None, errors
        # every change of the period was captured before the cut-off: dropped whole, and counted
        # as it was when dropped (the open transaction's rows were not visible when it was chosen)
        assert (result.partitions, result.changes, result.transactions) == (1, 2, 1)
        assert earlier not in {p.name for p in partitions.partitions(conn)}
        assert threadline.history(conn, "items", 1) == []
