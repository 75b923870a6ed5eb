"""The partitioned audit store on the real database: partitions made ahead and at the boundary,
the DEFAULT partition, retention by dropping whole partitions while writers keep writing, and the
seal chain across a dropped partition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ddl
from threadline.core.errors import ConfigurationError
from threadline.ops import partitions
from threadline.ops.erasure import erase
from threadline.ops.partition_migration import MigrationError, migrate_to_partitioned, migration_in_progress
from threadline.ops.retention import purge
from threadline.ops.seal import seal, verify

from .conftest import store_database

UTC = timezone.utc


@pytest.fixture
def store() -> Iterator[str]:
    """DSN of a fresh database with a partitioned (monthly) audit store and a tracked table."""
    yield from store_database("month", "threadline_parts")


@pytest.fixture
def plain() -> Iterator[str]:
    """DSN of a fresh database with a plain (unpartitioned) audit store and a tracked table."""
    yield from store_database(None, "threadline_parts")


def _month(at: datetime, months: int = 0) -> datetime:
    y, m = divmod(at.year * 12 + at.month - 1 + months, 12)
    return datetime(y, m + 1, 1, tzinfo=UTC)


def _home(conn: psycopg.Connection[Any], table: str, at: datetime) -> str:
    """The partition a row of ``table`` with start time ``at`` is routed to (as the owner)."""
    with conn.transaction():
        if table == "transactions":
            row = conn.execute(
                "INSERT INTO threadline.transactions (occurred_at) VALUES (%s) RETURNING tableoid::regclass::text",
                [at],
            ).fetchone()
        else:
            row = conn.execute(
                "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, occurred_at)"
                " VALUES (0, 'public', 'x', 'insert', %s) RETURNING tableoid::regclass::text",
                [at],
            ).fetchone()
        assert row is not None
        home: str = row[0]
        raise psycopg.Rollback()
    return home


def test_a_new_install_is_partitioned_monthly_with_partitions_ahead(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        assert partitions.is_partitioned(conn)
        assert partitions.partition_settings(conn) == partitions.PartitionSettings("month", 3)
        parts = partitions.partitions(conn)
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        for table in ("transactions", "changes"):
            mine = [p for p in parts if p.table == table]
            ranges = [(p.range_from, p.range_to) for p in mine if not p.is_default]
            assert ranges == [(_month(now, i), _month(now, i + 1)) for i in range(4)]
            assert [p.name for p in mine if p.is_default] == [f"{table}_default"]
        with threadline.context(actor="user:1", correlation_id="req-1"), threadline.transaction(conn):
            conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
        homes = conn.execute(
            "SELECT DISTINCT tableoid::regclass::text FROM threadline.transactions UNION ALL"
            " SELECT DISTINCT tableoid::regclass::text FROM threadline.changes"
        ).fetchall()
        suffix = f"_p{_month(now):%Y_%m}"
        assert sorted(h for (h,) in homes) == [
            f"threadline.changes{suffix}",
            f"threadline.transactions{suffix}",
        ]
        # a transaction and its changes share the start time they are partitioned by
        assert conn.execute(
            "SELECT count(*) FROM threadline.changes c JOIN threadline.transactions t"
            " ON t.id = c.transaction_id AND t.occurred_at = c.occurred_at"
        ).fetchone() == (2,)
        assert [
            c.transaction and c.transaction.correlation_id for c in threadline.history(conn, "items", 1)
        ] == ["req-1"]
        # a second install changes nothing
        assert not ddl.install(conn).changed
        assert len(partitions.partitions(conn)) == len(parts)


def test_midnight_on_the_first_belongs_to_the_new_month(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        first = _month(now, 1)
        for table in ("transactions", "changes"):
            assert _home(conn, table, first) == f"threadline.{table}_p{first:%Y_%m}"
            assert (
                _home(conn, table, first - timedelta(microseconds=1))
                == f"threadline.{table}_p{_month(now):%Y_%m}"
            )
            # beyond the partitions made ahead: the DEFAULT partition, never an error
            assert _home(conn, table, _month(now, 40)) == f"threadline.{table}_default"


def test_the_default_partition_takes_what_no_partition_holds_until_one_is_made(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        later = _month(now, 6) + timedelta(days=3, hours=5)
        with conn.transaction():
            tx = conn.execute(
                "INSERT INTO threadline.transactions (occurred_at) VALUES (%s) RETURNING id", [later]
            ).fetchone()[0]  # type: ignore[index]
            conn.execute(
                "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, occurred_at)"
                " VALUES (%s, 'public', 'items', 'insert', '{\"id\": 9}', %s)",
                [tx, later],
            )
        assert [p.rows for p in partitions.partitions(conn) if p.is_default] == [1, 1]
        made = partitions.create_partitions(conn, ahead=7)
        assert made == 8  # months 4 to 7 ahead, for both tables
        assert [p.rows for p in partitions.partitions(conn) if p.is_default] == [0, 0]
        home = conn.execute(
            "SELECT c.tableoid::regclass::text, t.tableoid::regclass::text FROM threadline.changes c"
            " JOIN threadline.transactions t ON t.id = c.transaction_id WHERE t.id = %s",
            [tx],
        ).fetchone()
        assert home == (
            f"threadline.changes_p{_month(later):%Y_%m}",
            f"threadline.transactions_p{_month(later):%Y_%m}",
        )
        assert partitions.create_partitions(conn, ahead=7) == 0  # idempotent
        with pytest.raises(ConfigurationError, match="ahead must be"):
            partitions.create_partitions(conn, ahead=-1)
        with pytest.raises(ConfigurationError, match="aware"):
            partitions.create_partitions(conn, since=datetime(2020, 1, 1))


def _fill_past_months(conn: psycopg.Connection[Any], months: int, per_month: int) -> datetime:
    """Capture ``per_month`` transactions per month for ``months`` months back (their start and
    capture times moved into the past), each in that month's own partition; returns the
    first month of the current period."""
    now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    key = 1000
    for back in range(months, 0, -1):
        for i in range(per_month):
            key += 1
            with (
                threadline.context(actor=f"user:{back}", correlation_id=f"m{back}-{i}"),
                threadline.transaction(conn),
            ):
                conn.execute("INSERT INTO items VALUES (%s, 'x')", [key])
                conn.execute("UPDATE items SET v = 'y' WHERE id = %s", [key])
            shift = now - (_month(now, -back) + timedelta(days=2, hours=i % 20))
            start = ", occurred_at = occurred_at - %(s)s" if partitions.is_partitioned(conn) else ""
            conn.execute(
                f"UPDATE threadline.changes SET captured_at = captured_at - %(s)s{start}"
                " WHERE transaction_id = (SELECT max(id) FROM threadline.transactions)",
                {"s": shift},
            )
            conn.execute(
                "UPDATE threadline.transactions SET occurred_at = occurred_at - %(s)s"
                " WHERE id = (SELECT max(id) FROM threadline.transactions)",
                {"s": shift},
            )
    partitions.create_partitions(conn, since=_month(now, -months))
    return _month(now)


def test_purge_drops_whole_partitions_and_deletes_only_at_the_edge(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        this_month = _fill_past_months(conn, months=4, per_month=5)
        assert [p.rows for p in partitions.partitions(conn) if p.is_default] == [0, 0]
        seal(conn, batch_size=3)
        # the cut-off falls inside the month two back: the two months before it go whole
        cutoff = _month(this_month, -2) + timedelta(days=2, hours=2, minutes=30)
        dry = purge(conn, cutoff, dry_run=True)
        # two months whole (10 transactions) and 3 transactions of the edge month
        assert (dry.partitions, dry.changes, dry.transactions) == (2, 26, 13)
        result = purge(conn, cutoff, batch_size=2)
        assert (result.partitions, result.changes, result.transactions) == (2, 26, 13)
        names = {p.name for p in partitions.partitions(conn)}
        for back in (3, 4):
            assert f"changes_p{_month(this_month, -back):%Y_%m}" not in names
            assert f"transactions_p{_month(this_month, -back):%Y_%m}" not in names
        assert f"changes_p{_month(this_month, -2):%Y_%m}" in names
        left = conn.execute("SELECT count(*), min(occurred_at) FROM threadline.transactions").fetchone()
        assert left is not None and left[0] == 7 and left[1] >= cutoff
        checked = verify(conn)
        assert checked.ok, checked.problems
        assert checked.purged == 13
        # the rest of the trail reads as before
        page = threadline.timeline(conn, table="items", limit=100)
        assert len(page.changes) == 14 and all(c.transaction is not None for c in page.changes)


def test_purge_by_partition_while_writers_keep_writing(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        this_month = _fill_past_months(conn, months=3, per_month=3)
        seal(conn)
    stop = threading.Event()
    written: list[int] = []
    waits: list[float] = []
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            with psycopg.connect(store, autocommit=True) as w:
                key = offset
                while not stop.is_set():
                    key += 1
                    t0 = time.monotonic()
                    with (
                        threadline.context(actor="user:w", correlation_id=f"w{key}"),
                        threadline.transaction(w),
                    ):
                        w.execute("INSERT INTO items VALUES (%s, 'w')", [key])
                    waits.append(time.monotonic() - t0)
                    written.append(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n * 1_000_000,)) for n in (1, 2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        with psycopg.connect(store, autocommit=True) as conn:
            result = purge(conn, _month(this_month, -1))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert result.partitions == 2 and result.changes == 12
    with psycopg.connect(store, autocommit=True) as conn:
        captured = conn.execute(
            "SELECT count(*) FROM threadline.changes WHERE table_name = 'items' AND op = 'insert'"
            " AND (pk ->> 'id')::int > 1000000"
        ).fetchone()
        assert captured == (len(written),) and len(written) > 10
        # no write waited longer than the drop's lock timeout allows, with room for a slow machine
        assert max(waits) < 5.0
        assert verify(conn).ok


def test_rows_move_out_of_the_default_partition_while_writers_keep_writing(store: str) -> None:
    # The job that makes partitions did not run: this month's are missing and every write lands in
    # the DEFAULT partitions. Making them, rows moved, must never fail a writer, whichever order
    # its transaction locks the two tables in.
    with psycopg.connect(store, autocommit=True) as conn:
        this_month = _month(conn.execute("SELECT now()").fetchone()[0])  # type: ignore[index]
        conn.execute(
            f"DROP TABLE threadline.changes_p{this_month:%Y_%m}, threadline.transactions_p{this_month:%Y_%m}"
        )
    stop = threading.Event()
    errors: list[str] = []
    written = [0] * 6

    def writer(i: int) -> None:
        with threadline.ThreadlineConnection.connect(store) as w:
            n = 0
            while not stop.is_set():
                n += 1
                key = i * 1_000_000 + n
                try:
                    with threadline.context(actor=f"user:{i}", correlation_id=f"w{i}"):
                        w.execute("INSERT INTO items VALUES (%s, 'a')", [key])
                        w.execute("UPDATE items SET v = 'b' WHERE id = %s", [key])  # looks its row up
                        w.commit()
                    written[i] += 2
                except psycopg.Error as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    w.rollback()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        with psycopg.connect(store, autocommit=True) as conn:
            for attempt in range(10):  # a writer holding a DEFAULT partition makes an attempt give way
                try:
                    made = partitions.create_partitions(conn, since=this_month, lock_timeout=0.5)
                    break
                except psycopg.errors.LockNotAvailable:
                    assert attempt < 9
            assert made == 2
            time.sleep(0.5)  # writes go on into the new partitions
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    with psycopg.connect(store, autocommit=True) as conn:
        assert [p.rows for p in partitions.partitions(conn) if p.is_default] == [0, 0]
        homes = conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM threadline.changes GROUP BY 1"
        ).fetchall()
        assert homes == [(f"threadline.changes_p{this_month:%Y_%m}", sum(written))]


def test_a_since_that_reaches_back_too_far_is_refused_before_anything_is_made(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        before = len(partitions.partitions(conn))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="at most 480 are created at once"):
            partitions.create_partitions(conn, since=datetime(1970, 1, 1, tzinfo=UTC))
        assert len(partitions.partitions(conn)) == before


def test_a_busy_partition_is_retried_under_lock_timeout(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        this_month = _fill_past_months(conn, months=2, per_month=2)
    old = f"threadline.changes_p{_month(this_month, -2):%Y_%m}"
    with psycopg.connect(store) as reader:
        reader.execute(f"SELECT count(*) FROM {old}")  # holds ACCESS SHARE until it ends
        timer = threading.Timer(1.5, reader.rollback)
        timer.start()
        with psycopg.connect(store, autocommit=True) as conn:
            t0 = time.monotonic()
            result = purge(conn, _month(this_month, -1))
            took = time.monotonic() - t0
        timer.join()
    assert result.partitions == 1 and took >= 1.0


def test_a_plain_store_purges_in_batches(plain: str) -> None:
    with psycopg.connect(plain, autocommit=True) as conn:
        assert not partitions.is_partitioned(conn)
        assert partitions.partition_settings(conn) is None
        assert partitions.partitions(conn) == []
        assert partitions.create_partitions(conn) == 0
        with pytest.raises(ConfigurationError, match="not partitioned"):
            partitions.set_partitions_ahead(conn, 6)
        conn.execute("INSERT INTO items VALUES (1, 'a')")
        conn.execute("UPDATE threadline.changes SET captured_at = captured_at - interval '100 days'")
        conn.execute("UPDATE threadline.transactions SET occurred_at = occurred_at - interval '100 days'")
        result = purge(conn, "90d")
        assert (result.partitions, result.changes, result.transactions) == (0, 1, 1)


def test_settings_persist_and_are_checked(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        partitions.set_partitions_ahead(conn, 6)
        assert partitions.partition_settings(conn) == partitions.PartitionSettings("month", 6)
        assert partitions.create_partitions(conn) == 6
        ddl.install(conn)  # reinstalling keeps the setting
        assert partitions.partition_settings(conn) == partitions.PartitionSettings("month", 6)
        with pytest.raises(ConfigurationError, match="ahead must be"):
            partitions.set_partitions_ahead(conn, 0)
    with pytest.raises(threadline.core.errors.SchemaError, match="partition_by must be one of"):
        ddl.install_sql(partition_by="fortnight")


def _consistent(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(transactions, changes) after checking every change shares its transaction's start time."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM threadline.transactions), (SELECT count(*) FROM threadline.changes),"
        " (SELECT count(*) FROM threadline.changes c JOIN threadline.transactions t"
        "   ON t.id = c.transaction_id AND t.occurred_at = c.occurred_at)"
    ).fetchone()
    assert row is not None and row[1] == row[2], row
    return row[0], row[1]


def test_a_plain_store_moves_to_partitions_online_and_resumes(plain: str) -> None:
    role = f"tl_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        ddl.schema.grant_app_role(conn, role)
        _fill_past_months(conn, months=5, per_month=40)
        head = seal(conn, batch_size=50).head
        before = conn.execute(
            "SELECT (SELECT count(*) FROM threadline.transactions), (SELECT count(*) FROM threadline.changes),"
            " (SELECT max(id) FROM threadline.transactions)"
        ).fetchone()
        assert before is not None
    # started from the command line with tiny batches, and killed part way through the copy
    env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "threadline.cli", "partitions", "--migrate", "--batch-size", "3"],
        env={**env, "THREADLINE_DSN": plain},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    copied = 0
    with psycopg.connect(plain, autocommit=True) as conn:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if migration_in_progress(conn):
                    row = conn.execute("SELECT count(*) FROM threadline.changes_partitioned").fetchone()
                    copied = row[0] if row else 0
                    if copied >= 30:
                        break
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL and 30 <= copied < before[1]
        assert migration_in_progress(conn) and not partitions.is_partitioned(conn)
        # meanwhile the old tables are the store: writes are captured, reads answer
        with threadline.context(actor="user:7", correlation_id="during"), threadline.transaction(conn):
            conn.execute("INSERT INTO items VALUES (1, 'during')")
        assert [c.op for c in threadline.history(conn, "items", 1)] == ["insert"]
        # and what would rewrite rows behind the copy is refused
        with pytest.raises(MigrationError, match="being moved"):
            purge(conn, "30d")
        with pytest.raises(MigrationError, match="being moved"):
            erase(conn, actor="user:7", reason="test")
        with pytest.raises(MigrationError, match="being moved"):
            threadline.take_baseline(conn, "items")

    # resumed, while the application keeps writing
    stop = threading.Event()
    written: list[int] = []
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            with psycopg.connect(plain, autocommit=True) as w:
                key = 100_000
                while not stop.is_set():
                    key += 1
                    with (
                        threadline.context(actor="user:w", correlation_id=f"w{key}"),
                        threadline.transaction(w),
                    ):
                        w.execute("INSERT INTO items VALUES (%s, 'w')", [key])
                    written.append(key)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with psycopg.connect(plain, autocommit=True) as conn:
            result = migrate_to_partitioned(conn, batch_size=25)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures
    assert result.partitions > 10 and result.switch_seconds < 5 and not result.kept_old
    with psycopg.connect(plain, autocommit=True) as conn:
        assert partitions.is_partitioned(conn) and not migration_in_progress(conn)
        n_tx, n_changes = _consistent(conn)
        assert n_tx == before[0] + 1 + len(written)
        assert n_changes == before[1] + 1 + len(written)
        assert conn.execute(
            "SELECT count(*) FROM threadline.changes WHERE table_name = 'items' AND (pk ->> 'id')::int > 100000"
        ).fetchone() == (len(written),)
        # every month in its own partition, nothing in the DEFAULT partitions
        assert [p.rows for p in partitions.partitions(conn) if p.is_default] == [0, 0]
        homes = conn.execute(
            "SELECT count(DISTINCT tableoid) FROM threadline.transactions WHERE occurred_at < date_trunc('month', now())"
        ).fetchone()
        assert homes == (5,)
        # the seal chain still holds: digests do not depend on the layout
        checked = verify(conn, expect_head=head)
        assert checked.ok and checked.transactions == before[0], checked.problems
        # new writes continue the ids and land in this month's partition
        with threadline.context(actor="user:8", correlation_id="after"), threadline.transaction(conn):
            conn.execute("UPDATE items SET v = 'after' WHERE id = 1")
        row = conn.execute(
            "SELECT id, tableoid::regclass::text FROM threadline.transactions WHERE correlation_id = 'after'"
        ).fetchone()
        assert (
            row is not None
            and row[0] > before[2] + len(written)
            and row[1].startswith("threadline.transactions_p")
        )
        assert [
            c.transaction and c.transaction.correlation_id for c in threadline.history(conn, "items", 1)
        ] == [
            "after",
            "during",
        ]
        assert threadline.trace(conn, "during").change_count == 1
        # the old tables are gone; the application role reads, and still cannot write
        assert conn.execute("SELECT to_regclass('threadline.transactions_plain')").fetchone() == (None,)
        privileges = conn.execute(
            "SELECT has_table_privilege(%(r)s, 'threadline.transactions', 'SELECT'),"
            " has_table_privilege(%(r)s, 'threadline.changes', 'SELECT'),"
            " has_table_privilege(%(r)s, 'threadline.changes', 'INSERT'),"
            " has_table_privilege(%(r)s, 'threadline.transactions', 'UPDATE')",
            {"r": role},
        ).fetchone()
        assert privileges == (True, True, False, False)
        with pytest.raises(MigrationError, match="already partitioned"):
            migrate_to_partitioned(conn)
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_pg_partman_can_take_the_partitions_over(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        available = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_partman'"
        ).fetchone()
        if available != (1,):
            pytest.skip("pg_partman is not installed on this server (apt-get install postgresql-15-partman)")
        conn.execute("CREATE SCHEMA partman")
        conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'").fetchone()
        assert version is not None
        mine = {p.name for p in partitions.partitions(conn)}
        # the documented hand-over: pg_partman brings its own DEFAULT partition
        with conn.transaction():
            conn.execute("LOCK TABLE threadline.changes, threadline.transactions IN ACCESS EXCLUSIVE MODE")
            for table in ("transactions", "changes"):
                conn.execute(
                    sql.SQL("DROP TABLE {}").format(sql.Identifier("threadline", f"{table}_default"))
                )
                if version[0].startswith("4."):
                    conn.execute(
                        "SELECT partman.create_parent(%s, 'occurred_at', 'native', 'monthly', p_premake := 6)",
                        [f"threadline.{table}"],
                    )
                else:
                    conn.execute(
                        "SELECT partman.create_parent(%s, 'occurred_at', '1 month', p_premake := 6)",
                        [f"threadline.{table}"],
                    )
        conn.execute("CALL partman.run_maintenance_proc()")
        after = partitions.partitions(conn)
        names = {p.name for p in after}
        assert mine <= names and len(names) > len(mine)  # threadline's partitions kept, pg_partman's added
        assert sum(1 for p in after if p.is_default) == 2
        # threadline's own job leaves pg_partman's periods alone and fills in beyond them
        made = partitions.create_partitions(conn, ahead=9)
        assert made == 6  # months 7 to 9 ahead, both tables
        assert conn.execute(
            "SELECT count(*) FROM threadline.partitions() a JOIN threadline.partitions() b"
            " ON a.parent = b.parent AND a.partition < b.partition"
            " AND a.range_from < b.range_to AND b.range_from < a.range_to"
        ).fetchone() == (0,)
        with threadline.context(actor="user:1", correlation_id="partman"), threadline.transaction(conn):
            conn.execute("INSERT INTO items VALUES (1, 'a')")
        assert [
            c.transaction and c.transaction.correlation_id for c in threadline.history(conn, "items", 1)
        ] == ["partman"]


def test_a_move_can_keep_the_old_tables_and_finish_later(plain: str) -> None:
    with psycopg.connect(plain, autocommit=True) as conn:
        for key in range(20):
            conn.execute("INSERT INTO items VALUES (%s, 'x')", [key])
        kept = migrate_to_partitioned(conn, keep_old=True, batch_size=7)
        assert kept.kept_old and (kept.transactions, kept.changes) == (20, 20)
        assert conn.execute("SELECT count(*) FROM threadline.changes_plain").fetchone() == (20,)
        assert _consistent(conn) == (20, 20)
        # something of the application's depends on an old table: the drop is refused, clearly
        conn.execute("CREATE VIEW public.old_changes AS SELECT id FROM threadline.changes_plain")
        with pytest.raises(MigrationError, match="were kept"):
            migrate_to_partitioned(conn)
        conn.execute("DROP VIEW public.old_changes")
        finished = migrate_to_partitioned(conn)
        assert (finished.transactions, finished.changes) == (0, 0)
        assert conn.execute("SELECT to_regclass('threadline.changes_plain')").fetchone() == (None,)
        with pytest.raises(MigrationError, match="already partitioned"):
            migrate_to_partitioned(conn)


def test_a_switch_that_deadlocks_with_a_writer_is_retried(
    plain: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that holds one audit table and asks for the other while the switch waits for it
    makes a deadlock; the server cancels the switch (it waited first), which is then retried."""
    with psycopg.connect(plain, autocommit=True) as conn:
        for key in range(5):
            conn.execute("INSERT INTO items VALUES (%s, 'x')", [key])
    writer = psycopg.connect(plain)
    crossed: list[BaseException] = []

    def cross_the_switch() -> None:
        try:
            with psycopg.connect(plain, autocommit=True) as watcher:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'switch'"
                        " AND wait_event_type = 'Lock'"
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    time.sleep(0.02)
            writer.execute("LOCK TABLE threadline.changes IN ROW EXCLUSIVE MODE")
            writer.commit()
        except BaseException as exc:
            crossed.append(exc)

    thread = threading.Thread(target=cross_the_switch)

    def progress(kind: str, rows: int) -> None:
        if not thread.is_alive() and thread.ident is None:
            # after the last copy round, before the switch: the writer holds one table
            writer.execute("LOCK TABLE threadline.transactions IN ROW EXCLUSIVE MODE")
            thread.start()

    caplog.set_level("INFO", logger="threadline")
    try:
        with psycopg.connect(plain, autocommit=True, application_name="switch") as conn:
            # the switch waits longer than the deadlock check (1 s), so the check decides
            result = migrate_to_partitioned(conn, batch_size=1000, lock_timeout=5.0, progress=progress)
    finally:
        thread.join(30)
        writer.close()
    assert not crossed, crossed
    assert "retrying the switch" in caplog.text
    assert (result.transactions, result.changes) == (5, 5) and not result.kept_old
    with psycopg.connect(plain, autocommit=True) as conn:
        assert partitions.is_partitioned(conn) and _consistent(conn) == (5, 5)


def test_truncates_recorded_in_a_plain_store_are_found_after_the_move(plain: str) -> None:
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a')")
        before = datetime.now(UTC)
        conn.execute("TRUNCATE items")
        migrate_to_partitioned(conn, batch_size=10)
        assert partitions.is_partitioned(conn)
        assert threadline.as_of(conn, "items", 1, before)["v"] == "a"
        with pytest.raises(threadline.RowDeleted, match="truncated"):
            threadline.as_of(conn, "items", 1, datetime.now(UTC))
        conn.execute("INSERT INTO items VALUES (1, 'b')")
        conn.execute("TRUNCATE items")
        joined = conn.execute(
            "SELECT count(*) FROM threadline.truncates x JOIN threadline.changes c"
            " ON c.transaction_id = x.transaction_id AND c.id = x.change_id AND c.occurred_at = x.occurred_at"
        ).fetchone()
        assert joined == (2,)
