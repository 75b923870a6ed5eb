"""Reversing the install (``uninstall_sql()``) on the real database: refused while any table of
audit records holds rows, naming those tables; the schema goes once they are empty."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from threadline.ddl import uninstall_sql
from threadline.ops.baseline import take_baseline
from threadline.ops.retention import purge
from threadline.ops.seal import seal

from .conftest import store_database


@pytest.fixture
def store() -> Iterator[str]:
    """DSN of a fresh database with an audit store and a tracked table ``items``."""
    yield from store_database("month", "threadline_uninstall")


def _refused(conn: psycopg.Connection[Any]) -> psycopg.errors.DependentObjectsStillExist:
    with pytest.raises(psycopg.errors.DependentObjectsStillExist) as refused:
        conn.execute(uninstall_sql())
    assert conn.execute("SELECT to_regnamespace('threadline') IS NOT NULL").fetchone() == (True,)
    return refused.value


def _left(error: psycopg.Error) -> str:
    message = error.diag.message_primary or ""
    assert message.startswith("threadline: the audit schema threadline holds audit rows; it is not dropped")
    return message.rsplit("(rows left in ", 1)[1].rstrip(")")


def test_task_runs_left_after_a_purge_keep_the_schema(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a')")
        assert "holds audit rows" in str(_refused(conn))
        purge(conn, "0s")
        conn.execute(
            "INSERT INTO threadline.task_runs (task_id, name, outcome, ended_at)"
            " VALUES ('t1', 'billing.charge', 'failed', now())"
        )
        error = _refused(conn)
        assert _left(error) == "task_runs"
        # a purge removes it in time: the way out is the usual one
        assert error.diag.message_hint == (
            'purge them first (threadline purge), or drop it by hand: DROP SCHEMA "threadline" CASCADE'
        )
        purge(conn, "0s")
        conn.execute(uninstall_sql())
        assert conn.execute("SELECT to_regnamespace('threadline')").fetchone() == (None,)


def test_the_seal_chain_and_baselines_left_after_a_purge_keep_the_schema(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
        take_baseline(conn, "items")
        seal(conn)
        purge(conn, "0s")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM threadline.changes), (SELECT count(*) FROM threadline.transactions)"
        ).fetchone()
        assert counts == (0, 0)
        assert _left(_refused(conn)) == "baselines, seals"
        conn.execute("INSERT INTO threadline.actions (name) VALUES ('invoice.sent')")
        error = _refused(conn)
        assert _left(error) == "actions, baselines, seals"
        assert error.diag.message_hint == (
            'purge them first (threadline purge), or drop it by hand: DROP SCHEMA "threadline" CASCADE;'
            " a purge keeps actions, baselines, seals: delete those rows with SQL if you mean to lose them"
        )
        conn.execute("DELETE FROM threadline.actions")
        conn.execute("DELETE FROM threadline.baselines")
        assert _left(_refused(conn)) == "seals"
        conn.execute("DELETE FROM threadline.seals")
        conn.execute(uninstall_sql())
        assert conn.execute("SELECT to_regnamespace('threadline')").fetchone() == (None,)
        conn.execute(uninstall_sql())  # and again, with nothing to remove
