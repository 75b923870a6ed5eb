"""The BRIN indexes of the audit tables leave the block range that takes new rows unsummarized, so
that a write does not widen a summary: on a new store, on partitions made later, and after an
upgrade of a store whose last range was summarized (by an index build of an earlier release)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from threadline import ddl

from .conftest import store_database

CONTEXT = '{"v":1,"actor":{"type":"user","id":"7"},"correlation_id":"brin"}'


@pytest.fixture(params=["month", None], ids=["partitioned", "plain"])
def store(request: pytest.FixtureRequest) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a new database with a store of each layout and a tracked table."""
    for dsn in store_database(request.param, "threadline_brin"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            yield conn


def write(conn: psycopg.Connection[Any], key: int) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT])
        conn.execute("INSERT INTO items VALUES (%s, 'x')", [key])


def tails(conn: psycopg.Connection[Any]) -> dict[str, bool]:
    """Each audit BRIN index on a table that holds rows: whether the range of the table's last
    block is unsummarized. brin_summarize_range() summarizes it only if it was not, and says how
    many ranges it summarized; rolled back, so the check leaves the index as it found it."""
    found: dict[str, bool] = {}
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_relation_size(i.indrelid) / current_setting('block_size')::int - 1"
        "  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam"
        "  JOIN pg_class t ON t.oid = i.indrelid"
        " WHERE a.amname = 'brin' AND t.relnamespace = 'threadline'::regnamespace AND t.relkind = 'r'"
        "   AND pg_relation_size(i.indrelid) > 0"
    ).fetchall()
    for index, last_block in rows:
        with conn.transaction(force_rollback=True):
            summarized = conn.execute("SELECT brin_summarize_range(%s::regclass, %s)", [index, last_block])
            found[index] = summarized.fetchone()[0] == 1
    return found


def test_new_store_leaves_the_last_range_unsummarized(store: psycopg.Connection[Any]) -> None:
    write(store, 1)
    found = tails(store)
    assert any(".transactions" in index for index in found), found
    assert any(".changes" in index for index in found), found
    assert all(found.values()), found


def test_install_unsummarizes_a_summarized_last_range(store: psycopg.Connection[Any]) -> None:
    write(store, 1)
    for index in tails(store):
        store.execute("SELECT brin_summarize_range(%s::regclass, 0)", [index])
    assert not any(tails(store).values())
    store.execute("COMMENT ON TABLE threadline.schema_version IS 'an earlier build'")
    assert ddl.install(store).refreshed
    found = tails(store)
    assert found and all(found.values()), found
    write(store, 2)
    assert store.execute(
        "SELECT count(*) FROM threadline.changes WHERE captured_at >= now() - interval '1 hour'"
        " AND captured_at <= clock_timestamp()"
    ).fetchone() == (2,)


def test_partitions_made_later_leave_their_range_unsummarized(store: psycopg.Connection[Any]) -> None:
    if store.execute("SELECT count(*) FROM threadline.partitioning").fetchone() == (0,):
        pytest.skip("a plain store has no partitions to make")
    made = store.execute("SELECT threadline.create_partitions(ahead => 8)").fetchone()
    assert made is not None and made[0] > 0
    store.execute(
        "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, occurred_at)"
        " VALUES (0, 'public', 'items', 'insert', now() + interval '7 months')"
    )
    part = store.execute(
        "SELECT tableoid::regclass::text FROM threadline.changes WHERE occurred_at > now() + interval '6 months'"
    ).fetchone()
    assert part is not None and part[0] != "threadline.changes_default"
    found = tails(store)
    assert found[f"{part[0]}_captured_at_idx"], found


def test_indexes_of_another_owner_are_skipped(store: psycopg.Connection[Any]) -> None:
    """A role that owns none of the indexes (as with a partition made by another role) gets a count
    of 0, not an error: desummarizing is the owner's right, and partition upkeep must not fail."""
    write(store, 1)
    role = f"brin_{uuid.uuid4().hex[:8]}"
    store.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        store.execute(sql.SQL("GRANT USAGE ON SCHEMA threadline TO {}").format(sql.Identifier(role)))
        store.execute(
            sql.SQL("GRANT EXECUTE ON FUNCTION threadline.unsummarize_brin_tail(regclass) TO {}").format(
                sql.Identifier(role)
            )
        )
        with store.transaction(force_rollback=True):
            store.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            counted = store.execute(
                "SELECT threadline.unsummarize_brin_tail('threadline.changes'),"
                " threadline.unsummarize_brin_tail('threadline.transactions')"
            ).fetchone()
        assert counted == (0, 0)
        owned = store.execute(
            "SELECT threadline.unsummarize_brin_tail('threadline.changes')"
            " + threadline.unsummarize_brin_tail('threadline.transactions')"
        ).fetchone()
        assert owned is not None and owned[0] >= 2
    finally:
        store.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        store.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
