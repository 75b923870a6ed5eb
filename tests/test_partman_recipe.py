"""The pg_partman takeover recipe of ``docs/operations.md``, run as written on a live system: a
writer in the middle of a capture (its change recorded, its transaction's row not yet) neither
deadlocks with it nor fails."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import threadline

from .conftest import store_database

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"


def _recipe() -> str:
    """The SQL block of the documented takeover (the one that calls ``create_parent``)."""
    blocks = re.findall(r"```sql\n(.*?)```", OPERATIONS.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "partman.create_parent" in b]
    assert len(found) == 1, found
    return "\n".join(line.strip() for line in found[0].splitlines())


@pytest.fixture
def store() -> Iterator[str]:
    """DSN of a fresh database with a monthly partitioned audit store, a tracked ``items`` and
    pg_partman 4 (the version the recipe is written for) in schema ``partman``."""
    for dsn in store_database("month", "threadline_partman"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'"
            ).fetchone()
            if row is None or not row[0].startswith("4."):
                pytest.skip(
                    "pg_partman 4 is not installed on this server (apt-get install postgresql-15-partman)"
                )
            conn.execute("CREATE SCHEMA partman")
            conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
        yield dsn


def test_the_documented_takeover_does_not_deadlock_with_a_writer(store: str) -> None:
    recipe = _recipe()
    with psycopg.connect(store) as writer, psycopg.connect(store, autocommit=True) as watch:
        # a capture between its two inserts holds changes (its change) and is about to write
        # transactions (its transaction's row): the lock it holds at that moment
        writer.execute("LOCK TABLE threadline.changes IN ROW EXCLUSIVE MODE")
        errors: list[BaseException] = []
        taker = psycopg.connect(store, autocommit=True)
        pid = taker.info.backend_pid

        def take_over() -> None:
            try:
                taker.execute(recipe)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=take_over)
        thread.start()
        try:
            blocked = False
            for _ in range(2000):  # until the recipe waits for the writer
                row = watch.execute("SELECT %s = ANY (pg_blocking_pids(%s))", [writer.info.backend_pid, pid])
                blocked = bool((row.fetchone() or (False,))[0])
                if blocked or not thread.is_alive():
                    break
                time.sleep(0.01)
            assert blocked, f"the recipe did not wait for the writer: {errors}"
            # the capture goes on: a write of a tracked table records its change and its transaction
            with threadline.context(actor="user:1", correlation_id="during the takeover"):
                writer.execute("INSERT INTO items VALUES (1, 'a')")
                writer.commit()
        finally:
            thread.join(60)
            taker.close()
        assert not errors, errors
    with psycopg.connect(store, autocommit=True) as conn:
        parents = conn.execute("SELECT parent_table FROM partman.part_config ORDER BY 1").fetchall()
        assert parents == [("threadline.changes",), ("threadline.transactions",)]
        assert [c.op for c in threadline.history(conn, "items", 1)] == ["insert"]
        defaults = conn.execute(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent IN ('threadline.changes'::regclass, 'threadline.transactions'::regclass)"
            " AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'"
        ).fetchone()
        assert defaults == (2,)  # pg_partman's own
