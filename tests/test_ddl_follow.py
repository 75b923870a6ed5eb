"""The event triggers and the registry under schema changes, on the real database: what a change
of a type a column holds, a change that leaves the capture code as it was, and a regeneration
keep; what a DDL statement that changes nothing captured must not lock; and, without the event
triggers (drift-safe code), the masks that ``sync``, ``untrack`` and inheritance keep."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import threadline
from threadline import ddl

from .conftest import changes


def _status(conn: psycopg.Connection[Any], table: str) -> str:
    row = conn.execute(
        "SELECT status FROM threadline.tracking_status() WHERE table_name = %s", [table]
    ).fetchone()
    assert row is not None
    return str(row[0])


def test_a_type_a_column_holds_changing_regenerates_the_capture_code(conn: Any) -> None:
    conn.execute("CREATE TYPE app.comp AS (a int)")
    conn.execute("CREATE TYPE app.mood AS ENUM ('ok', 'sad')")
    conn.execute("CREATE TABLE app.ct (id int PRIMARY KEY, c app.comp)")
    conn.execute("CREATE TABLE app.cast_log (note text)")
    ddl.track(conn, "app.ct")
    conn.execute("ALTER TYPE app.comp ADD ATTRIBUTE m app.mood")
    assert _status(conn, "ct") == "installed"
    # a cast the application defines never runs inside capture (which runs as the schema's owner)
    conn.execute(
        "CREATE FUNCTION app.mood_json(app.mood) RETURNS json LANGUAGE plpgsql AS"
        " $$ BEGIN INSERT INTO app.cast_log VALUES ('ran'); RETURN to_json($1::text); END $$"
    )
    conn.execute("CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood)")
    conn.execute("INSERT INTO app.ct VALUES (3, ROW(3, 'sad'))")
    assert conn.execute("SELECT count(*) FROM app.cast_log").fetchone() == (0,)
    assert changes(conn)[-1]["after"]["c"] == "(3,sad)"
    # a float held by the type is recorded exactly, whatever the session prints
    conn.execute("CREATE TYPE app.cf AS (a int)")
    conn.execute("CREATE TABLE app.cft (id int PRIMARY KEY, c app.cf)")
    ddl.track(conn, "app.cft")
    conn.execute("INSERT INTO app.cft VALUES (1, ROW(1))")
    conn.execute("ALTER TYPE app.cf ADD ATTRIBUTE f float8")
    conn.execute("UPDATE app.cft SET c = ROW(1, 1.0000000000000002)")
    conn.execute("SET extra_float_digits = 0")
    try:
        conn.execute("UPDATE app.cft SET c = ROW(1, 1.0000000000000004)")
    finally:
        conn.execute("RESET extra_float_digits")
    updates = [c for c in changes(conn) if c["table_name"] == "cft" and c["op"] == "update"]
    assert len(updates) == 2, updates


def test_ddl_that_changes_nothing_captured_takes_no_lock_on_a_tracked_table(dsn: str, conn: Any) -> None:
    conn.execute("CREATE TABLE app.acc (id int PRIMARY KEY, v int CHECK (v >= 0), name varchar(20))")
    conn.execute("CREATE TABLE app.unrelated (a int)")
    ddl.track(conn, "app.acc")
    # the same capture code for other column types: the registry follows all the same
    conn.execute("ALTER TABLE app.acc ALTER COLUMN v TYPE bigint, ALTER COLUMN name TYPE varchar(50)")
    stale = conn.execute(
        "SELECT columns IS DISTINCT FROM threadline.columns_snapshot(relid) FROM threadline.tracked_tables"
    ).fetchone()
    assert stale == (False,)
    conn.execute("ALTER TABLE app.acc ADD CONSTRAINT v_small CHECK (v < 1000000) NOT VALID")
    with psycopg.connect(dsn) as writer:
        writer.execute("INSERT INTO app.acc VALUES (1, 1, 'x')")  # open: holds ROW EXCLUSIVE on acc
        with psycopg.connect(dsn, autocommit=True) as migration:
            migration.execute("SET lock_timeout = '2s'")
            # neither waits for the writer: no capture code changes
            migration.execute("ALTER TABLE app.unrelated ADD COLUMN b int")
            migration.execute("ALTER TABLE app.acc VALIDATE CONSTRAINT v_small")
            migration.execute("ALTER TABLE app.acc ALTER COLUMN v SET STATISTICS 500")
        writer.commit()
    assert [c["op"] for c in changes(conn)] == ["insert"]


def test_regenerating_keeps_the_capture_triggers_firing_as_set(conn: Any) -> None:
    conn.execute("CREATE TABLE app.rp (id int PRIMARY KEY, note text)")
    ddl.track(conn, "app.rp")
    conn.execute("ALTER TABLE app.rp ENABLE ALWAYS TRIGGER threadline_capture_insert")
    conn.execute("ALTER TABLE app.rp ENABLE REPLICA TRIGGER threadline_capture_update")
    conn.execute("ALTER TABLE app.rp DISABLE TRIGGER threadline_capture_delete")
    conn.execute("ALTER TABLE app.rp ADD COLUMN extra int")  # regenerated
    states = conn.execute(
        "SELECT tgname::text, tgenabled::text FROM pg_trigger WHERE tgrelid = 'app.rp'::regclass"
        " AND tgname LIKE 'threadline_capture_%' ORDER BY 1"
    ).fetchall()
    assert states == [
        ("threadline_capture_delete", "D"),
        ("threadline_capture_insert", "A"),
        ("threadline_capture_truncate", "O"),
        ("threadline_capture_update", "R"),
    ]
    conn.execute("SET session_replication_role = replica")
    try:
        conn.execute("INSERT INTO app.rp VALUES (2, 'b')")
    finally:
        conn.execute("RESET session_replication_role")
    assert [c["op"] for c in changes(conn)] == ["insert"]


@pytest.fixture
def drift_safe(conn: Any) -> Any:
    conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl DISABLE")
    conn.execute("ALTER EVENT TRIGGER threadline_follow_drop DISABLE")
    try:
        yield conn
    finally:
        conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl ENABLE ALWAYS")
        conn.execute("ALTER EVENT TRIGGER threadline_follow_drop ENABLE ALWAYS")


def test_without_event_triggers_sync_passes_a_rebuilt_tables_masks_on(drift_safe: Any) -> None:
    conn = drift_safe
    conn.execute("CREATE TABLE app.rb (id int PRIMARY KEY, ssn text)")
    ddl.track(conn, "app.rb", mask=["ssn"])
    conn.execute("CREATE TABLE app.rb_new (id int PRIMARY KEY, ssn text)")
    conn.execute("DROP TABLE app.rb")
    conn.execute("ALTER TABLE app.rb_new RENAME TO rb")
    conn.execute("SELECT * FROM threadline.sync()")  # prunes the dropped table's registry row
    assert ddl.track(conn, "app.rb").mask == ("ssn",)
    conn.execute("INSERT INTO app.rb VALUES (1, '123-45-6789')")
    assert "123-45" not in repr(changes(conn))


def test_without_event_triggers_untrack_keeps_a_renamed_masked_column(drift_safe: Any) -> None:
    conn = drift_safe
    conn.execute("CREATE TABLE app.ut (id int PRIMARY KEY, ssn text)")
    ddl.track(conn, "app.ut", mask=["ssn"])
    conn.execute("ALTER TABLE app.ut RENAME COLUMN ssn TO tax_id")
    ddl.untrack(conn, "app.ut")
    assert ddl.track(conn, "app.ut").mask == ("tax_id",)
    conn.execute("INSERT INTO app.ut VALUES (1, '123-45-6789')")
    assert "123-45" not in repr(changes(conn))


def test_without_event_triggers_a_parent_gaining_a_childs_masked_column_masks_it(drift_safe: Any) -> None:
    conn = drift_safe
    conn.execute("CREATE TABLE app.ip (id int PRIMARY KEY, note text)")
    conn.execute("CREATE TABLE app.ic (ssn text, PRIMARY KEY (id)) INHERITS (app.ip)")
    ddl.track(conn, "app.ip")
    ddl.track(conn, "app.ic", mask=["ssn"])
    conn.execute("INSERT INTO app.ic VALUES (1, 'n', 'SECRET-1')")
    conn.execute("ALTER TABLE app.ip ADD COLUMN ssn text")  # the child's column merges into it
    conn.execute("UPDATE app.ip SET note = 'm'")  # through the parent: the parent's code
    assert "SECRET-1" not in repr(changes(conn))
    assert threadline.history(conn, "app.ip", 1)[0].after is not None


def test_a_refresh_of_the_schema_while_writers_write_fails_no_write(dsn: str, conn: Any) -> None:
    import threading

    # another tracked table comes first in the refresh's lock order: the written ones are taken
    # after it, between two of the writers' transactions
    conn.execute("CREATE TABLE app.w0 (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE app.wa (id serial PRIMARY KEY, v int)")
    conn.execute("CREATE TABLE app.wb (id serial PRIMARY KEY, v int)")
    ddl.track(conn, "app.w0")
    ddl.track(conn, "app.wa")
    ddl.track(conn, "app.wb")
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def writer(first: str, second: str) -> None:
        with psycopg.connect(dsn) as c:
            while not stop.is_set():
                try:
                    with threadline.context(actor="user:w"), c.transaction():
                        c.execute(f"INSERT INTO {first} (v) VALUES (1)")
                        c.execute(f"INSERT INTO {second} (v) VALUES (2)")
                    done[0] += 1
                except BaseException as exc:  # every failure counts
                    errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=pair) for pair in (("app.wa", "app.wb"), ("app.wb", "app.wa"))
    ]
    for t in threads:
        t.start()
    try:
        for _ in range(5):  # a store written by another build of this version: install refreshes it
            conn.execute(
                "COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0'"
            )
            conn.execute(
                "UPDATE threadline.tracked_tables SET fingerprint = 'another build'"
            )  # code replaced
            assert ddl.install(conn, attempts=100, lock_timeout=0.5).refreshed
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and done[0] > 0
    written = conn.execute("SELECT (SELECT count(*) FROM app.wa) + (SELECT count(*) FROM app.wb)").fetchone()
    assert written == (conn.execute("SELECT count(*) FROM threadline.changes").fetchone() or (0,))


def test_a_refresh_never_makes_a_writer_holding_a_tracked_table_a_deadlock_victim(
    dsn: str, conn: Any
) -> None:
    import threading
    import time

    # another tracked table comes first in the refresh's lock order, as in any real database
    conn.execute("CREATE TABLE app.da0 (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE app.da (id serial PRIMARY KEY, v int)")
    ddl.track(conn, "app.da0")
    ddl.track(conn, "app.da")
    # a store written by another build of this version: install replaces the capture code
    conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0'")
    conn.execute("UPDATE threadline.tracked_tables SET fingerprint = 'another build'")
    refreshed: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as installer, psycopg.connect(dsn) as writer:
        # the writer checks for a deadlock first, so that it would be the one cancelled (after
        # the refresh's brief waits, which are shorter than half the refresh's own delay)
        writer.execute("SET deadlock_timeout = '200ms'")
        installer.execute("SET deadlock_timeout = '2s'")
        # the writer holds the table as between its row write and its capture's insert
        writer.execute("LOCK TABLE app.da IN ROW EXCLUSIVE MODE")
        refresh = threading.Thread(
            target=lambda: refreshed.append(ddl.install(installer, attempts=20, lock_timeout=30))
        )
        refresh.start()
        pid = installer.info.backend_pid
        for _ in range(150):  # until the refresh waits for a lock (or gives the writer way)
            waiting = conn.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()
            if waiting == (True,) or not refresh.is_alive():
                break
            time.sleep(0.01)
        with threadline.context(actor="user:w"):
            writer.execute("INSERT INTO app.da (v) VALUES (1)")  # its capture writes the audit tables
            writer.commit()
        refresh.join()
    assert refreshed and refreshed[0].refreshed
    assert conn.execute("SELECT count(*) FROM threadline.changes WHERE table_name = 'da'").fetchone() == (1,)


def test_a_baseline_is_refused_in_sql_while_the_store_moves_to_partitions(conn: Any) -> None:
    conn.execute("CREATE TABLE app.bl (id int PRIMARY KEY)")
    ddl.track(conn, "app.bl")
    conn.execute("CREATE TABLE threadline.transactions_partitioned (LIKE threadline.transactions)")
    try:
        with (
            pytest.raises(
                psycopg.errors.ObjectNotInPrerequisiteState, match="being moved to the partitioned layout"
            ),
            conn.transaction(),
        ):
            conn.execute("SELECT * FROM threadline.baseline_batch('app.bl'::regclass, 10)")
    finally:
        conn.execute("DROP TABLE threadline.transactions_partitioned")
    conn.execute("SELECT * FROM threadline.baseline_batch('app.bl'::regclass, 10)")
