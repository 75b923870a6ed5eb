"""Baselines: every row of a tracked table recorded once (resumable, masked like capture), and the
table as it was (``as_of`` without a key), through the API, the CLI and the SQL procedure."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ActorRef
from threadline.core.errors import ConfigurationError, TrackingError
from threadline.explore.as_of_query import NoBaseline, NotYetAudited, RowDeleted
from threadline.ops import health
from threadline.ops.baseline import BaselineProgress, baseline_sql

from .conftest import changes, transactions
from .test_cli import run

Conn = psycopg.Connection[Any]
Moment = tuple[datetime, list[dict[str, Any]]]

BIG_ROWS = int(os.environ.get("THREADLINE_TEST_BASELINE_ROWS", "1000000"))
"""Rows of the table whose baseline is interrupted and resumed (the size the feature is asked for)."""


@pytest.fixture(autouse=True)
def _no_baselines(conn: Conn) -> None:
    """Every test starts with no baseline recorded."""
    conn.execute("DELETE FROM threadline.baselines")


class Stop(Exception):
    """Raised by a progress callback to interrupt a baseline after a committed batch."""


def _now(conn: Conn) -> datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _moment(conn: Conn, table: str, order: str = "id") -> Moment:
    """The database's time now and the table's rows then (committed), in key order."""
    row = conn.execute(
        sql.SQL(
            "SELECT clock_timestamp(), coalesce(jsonb_agg(to_jsonb(t) ORDER BY {}), '[]') FROM {} t"
        ).format(sql.SQL(order), sql.SQL(table))
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def _table(conn: Conn, table: str, at: datetime) -> list[dict[str, Any]]:
    return list(threadline.as_of(conn, table, at=at))


def _assert_as_of(conn: Conn, table: str, moment: Moment, keys: Any) -> None:
    """The table as it was at the moment, and each of ``keys`` (ids) one at a time, are what it held."""
    at, rows = moment
    assert _table(conn, table, at) == rows, at
    by_key = {r["id"]: r for r in rows}
    for key in keys:
        if key in by_key:
            assert threadline.as_of(conn, table, key, at) == by_key[key], (key, at)
        else:
            with pytest.raises((NotYetAudited, RowDeleted)):
                threadline.as_of(conn, table, key, at)


def _snapshots(conn: Conn, table_name: str) -> list[dict[str, Any]]:
    return [c for c in changes(conn) if c["op"] == "snapshot" and c["table_name"] == table_name]


def _baseline_of(report: health.CoverageReport) -> dict[str, str | None]:
    return {t.table_name or "": t.baseline for t in report.tables}


def _interrupt_after(batches: int) -> Callable[[BaselineProgress], None]:
    """A progress callback that stops the baseline after ``batches`` committed batches."""
    seen: list[BaselineProgress] = []

    def progress(step: BaselineProgress) -> None:
        seen.append(step)
        if len(seen) >= batches and not step.finished:
            raise Stop

    return progress


# ---------------------------------------------------------------------------------------------
# Taking a baseline


_ACCOUNTS = (
    "(id int PRIMARY KEY, name text, card text, note text, balance numeric(10, 2), tags text[],"
    " seen timestamptz, extra jsonb)"
)
_ACCOUNT_ROWS = (
    "SELECT g, 'name ' || g, '4111-' || g, 'note ' || g, g * 1.25, ARRAY['a', g::text],"
    " timestamptz '2024-01-01 00:00+00' + g * interval '90 minutes', jsonb_build_object('k', g, 'deep', ARRAY[g])"
    " FROM generate_series(1, 7) g"
)


def test_baseline_records_each_row_once_masked_and_excluded_as_capture_would(conn: Conn) -> None:
    conn.execute(f"CREATE TABLE app.accounts {_ACCOUNTS}")
    conn.execute(f"CREATE TABLE app.twins {_ACCOUNTS}")
    conn.execute(f"INSERT INTO app.accounts {_ACCOUNT_ROWS}")
    for table in ("app.accounts", "app.twins"):
        threadline.ddl.track(conn, table, mask="card", exclude="note")
    assert _baseline_of(health.coverage(conn, schemas=["app"]))["accounts"] == "none"
    steps: list[BaselineProgress] = []
    with threadline.context(actor=ActorRef.user("7"), meta={"ticket": "T-1"}):
        result = threadline.take_baseline(conn, "app.accounts", batch_size=3, progress=steps.append)
    assert [(s.batch_rows, s.rows, s.finished) for s in steps] == [(3, 3, False), (3, 6, False), (1, 7, True)]
    assert result == steps[-1] and result.table == "app.accounts"
    assert len({s.baseline_id for s in steps}) == 1

    snapshots = _snapshots(conn, "accounts")
    assert [c["pk"] for c in snapshots] == [{"id": i} for i in range(1, 8)]
    assert all(c["before"] is None and c["table_schema"] == "app" for c in snapshots)
    # the same rows inserted into a table tracked with the same options: capture's images
    conn.execute(f"INSERT INTO app.twins {_ACCOUNT_ROWS}")
    inserted = {c["pk"]["id"]: c["after"] for c in changes(conn) if c["op"] == "insert"}
    assert {c["pk"]["id"]: c["after"] for c in snapshots} == inserted
    assert (
        inserted[1]["card"] == "[masked]" and "note" not in inserted[1] and inserted[1]["tags"] == ["a", "1"]
    )

    (tx,) = [t for t in transactions(conn) if t["meta"] and "baseline" in t["meta"]]
    assert {c["transaction_id"] for c in snapshots} == {tx["id"]}
    assert tx["meta"] == {"ticket": "T-1", "baseline": "app.accounts"}
    assert tx["actor"] == {"type": "user", "id": "7"}
    (baseline,) = threadline.baselines(conn)
    assert (baseline.table_schema, baseline.table_name, baseline.transaction_id, baseline.rows) == (
        "app",
        "accounts",
        tx["id"],
        7,
    )
    assert baseline.finished_at is not None and baseline.started_at <= baseline.finished_at
    assert baseline.ended_at is None
    assert _baseline_of(health.coverage(conn, schemas=["app"])) == {"accounts": "complete", "twins": "none"}


def test_coverage_shows_complete_in_progress_and_none_and_an_interrupted_baseline_continues(
    conn: Conn, dsn: str
) -> None:
    for name in ("full", "half", "bare"):
        conn.execute(f"CREATE TABLE app.{name} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO app.{name} SELECT g, 'v' || g FROM generate_series(1, 10) g")
        threadline.ddl.track(conn, f"app.{name}")
    conn.execute("CREATE TABLE app.untracked (id int PRIMARY KEY)")
    threadline.take_baseline(conn, "app.full", batch_size=4)
    with pytest.raises(Stop):
        threadline.take_baseline(conn, "app.half", batch_size=4, progress=_interrupt_after(2))
    assert len(_snapshots(conn, "half")) == 8

    report = health.coverage(conn, schemas=["app"])
    assert _baseline_of(report) == {
        "full": "complete",
        "half": "in progress",
        "bare": "none",
        "untracked": None,
    }
    res = run("coverage", "--table-schema", "app", "--all", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("  BASELINE")
    expected = {"app.bare": "none", "app.full": "complete", "app.half": "in progress", "app.untracked": "-"}
    for line, (name, shown) in zip(lines[1:5], expected.items(), strict=True):
        assert line.startswith(name + " ") and line.endswith("  " + shown), line
    as_json = json.loads(run("coverage", "--table-schema", "app", "--json", "--dsn", dsn).stdout)
    assert {t["table"]: t["baseline"] for t in as_json["tables"]} == {
        "app.bare": "none",
        "app.full": "complete",
        "app.half": "in progress",
        "app.untracked": None,
    }

    # taken again, it continues after the last committed batch: nothing twice, nothing missing
    done = threadline.take_baseline(conn, "app.half", batch_size=4)
    assert (done.batch_rows, done.rows, done.finished) == (2, 10, True)
    assert [c["pk"]["id"] for c in _snapshots(conn, "half")] == list(range(1, 11))
    assert len({c["transaction_id"] for c in _snapshots(conn, "half")}) == 1


def test_a_complete_baseline_is_kept_and_tracking_again_starts_a_new_one(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.items (id int PRIMARY KEY, name text)")
    conn.execute("INSERT INTO app.items SELECT g, 'item ' || g FROM generate_series(1, 5) g")
    threadline.ddl.track(conn, "app.items")
    first = threadline.take_baseline(conn, "app.items", batch_size=2)
    recorded = (len(changes(conn)), len(transactions(conn)))
    again = threadline.take_baseline(conn, "app.items", batch_size=2)
    assert (again.batch_rows, again.rows, again.finished, again.baseline_id) == (
        0,
        5,
        True,
        first.baseline_id,
    )
    assert (len(changes(conn)), len(transactions(conn))) == recorded

    conn.execute("UPDATE app.items SET name = 'tracked' WHERE id = 1")
    conn.execute("DELETE FROM app.items WHERE id = 2")
    tracked_at, tracked_rows = _moment(conn, "app.items")
    threadline.ddl.untrack(conn, "app.items")
    (old,) = threadline.baselines(conn)
    assert old.ended_at is not None and old.finished_at is not None
    with pytest.raises(TrackingError, match="not tracked"):
        threadline.take_baseline(conn, "app.items")
    # changed unseen while untracked
    conn.execute("UPDATE app.items SET name = 'unseen' WHERE id = 1")
    conn.execute("INSERT INTO app.items VALUES (2, 'back')")
    conn.execute("DELETE FROM app.items WHERE id = 3")
    untracked_at = _now(conn)
    threadline.ddl.track(conn, "app.items")
    assert _baseline_of(health.coverage(conn, schemas=["app"])) == {"items": "none"}
    second = threadline.take_baseline(conn, "app.items", batch_size=2)
    assert second.baseline_id != first.baseline_id and second.rows == 4
    old, new = threadline.baselines(conn)
    assert old.ended_at is not None and new.ended_at is None and old.ended_at < new.started_at
    assert old.transaction_id != new.transaction_id

    # the new baseline outdates what was captured before the table was tracked again
    now, rows = _moment(conn, "app.items")
    assert _table(conn, "app.items", now) == rows
    assert threadline.as_of(conn, "app.items", 1, now) == {"id": 1, "name": "unseen"}
    assert threadline.as_of(conn, "app.items", 2, now) == {"id": 2, "name": "back"}
    with pytest.raises(NotYetAudited, match="did not exist"):
        threadline.as_of(conn, "app.items", 3, now)
    # the first baseline still tells the table as it was while it was in force
    assert _table(conn, "app.items", tracked_at) == tracked_rows
    assert threadline.as_of(conn, "app.items", 3, tracked_at) == {"id": 3, "name": "item 3"}
    with pytest.raises(NoBaseline, match="after that time"):
        threadline.as_of(conn, "app.items", at=untracked_at)


def test_dropping_a_table_ends_its_baseline(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.gone (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.gone SELECT g, 'old ' || g FROM generate_series(1, 3) g")
    threadline.ddl.track(conn, "app.gone")
    threadline.take_baseline(conn, "app.gone")
    before_drop, old_rows = _moment(conn, "app.gone")
    conn.execute("DROP TABLE app.gone")
    (ended,) = threadline.baselines(conn)
    assert ended.ended_at is not None
    dropped_at = _now(conn)
    conn.execute("CREATE TABLE app.gone (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.gone SELECT g, 'new ' || g FROM generate_series(2, 5) g")
    threadline.ddl.track(conn, "app.gone")
    threadline.take_baseline(conn, "app.gone")
    now, rows = _moment(conn, "app.gone")
    assert _table(conn, "app.gone", now) == rows
    assert _table(conn, "app.gone", before_drop) == old_rows
    with pytest.raises(NoBaseline):
        threadline.as_of(conn, "app.gone", at=dropped_at)


def test_baseline_of_tables_with_unusual_columns_and_keys(conn: Conn) -> None:
    # columns named like the statement's aliases, a NOT NULL domain, a key in the "C" collation
    conn.execute("CREATE DOMAIN app.positive AS int NOT NULL CHECK (VALUE > 0)")
    conn.execute(
        'CREATE TABLE app.odd (code text COLLATE "C", seen timestamptz, r text, l int, n app.positive,'
        " PRIMARY KEY (code, seen))"
    )
    conn.execute(
        "INSERT INTO app.odd SELECT c, timestamptz '2024-01-01 00:00+00' + s * interval '1 day', c || s, s, s"
        " FROM unnest(ARRAY['a', 'B', 'b', 'A', 'é', 'Z']) c, generate_series(1, 3) s"
    )
    threadline.ddl.track(conn, "app.odd")
    result = threadline.take_baseline(conn, "app.odd", batch_size=1)
    assert (result.rows, result.finished) == (18, True)
    snapshots = _snapshots(conn, "odd")
    real = conn.execute('SELECT to_jsonb(t) FROM app.odd t ORDER BY code COLLATE "C", seen').fetchall()
    assert [c["after"] for c in snapshots] == [r[0] for r in real]  # key order, each row once
    assert snapshots[0]["after"]["r"] == "A1" and snapshots[0]["after"]["l"] == 1
    now, rows = _moment(conn, "app.odd", 'code COLLATE "C", seen')
    shown = _table(conn, "app.odd", now)
    assert sorted(json.dumps(r, sort_keys=True) for r in shown) == sorted(
        json.dumps(r, sort_keys=True) for r in rows
    )


def test_two_takers_at_once_share_the_work(conn: Conn, dsn: str) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.t SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    threadline.ddl.track(conn, "app.t")
    results: list[BaselineProgress] = []
    batches: list[int] = []

    def take() -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            results.append(
                threadline.take_baseline(
                    own, "app.t", batch_size=100, progress=lambda p: batches.append(p.batch_rows)
                )
            )

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [(r.rows, r.finished) for r in results] == [(5000, True), (5000, True)]
    assert sum(batches) == 5000
    counts = conn.execute(
        "SELECT count(*), count(DISTINCT pk), count(DISTINCT transaction_id) FROM threadline.changes"
        " WHERE op = 'snapshot'"
    ).fetchone()
    assert counts == (5000, 5000, 1)


def test_take_baseline_refuses_an_open_transaction_and_bad_arguments(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY)")
    with pytest.raises(TrackingError, match="not tracked"):
        threadline.take_baseline(conn, "app.t")
    with pytest.raises(TrackingError, match="not found"):
        threadline.take_baseline(conn, "app.missing")
    threadline.ddl.track(conn, "app.t")
    with pytest.raises(ConfigurationError, match="batch_size"):
        threadline.take_baseline(conn, "app.t", batch_size=0)
    with conn.transaction(), pytest.raises(ConfigurationError, match="no open transaction"):
        threadline.take_baseline(conn, "app.t")
    assert threadline.baselines(conn) == []


# ---------------------------------------------------------------------------------------------
# Interrupted and resumed, at scale


def test_a_killed_baseline_resumes_with_no_snapshot_missing_or_twice(conn: Conn, dsn: str) -> None:
    batch = 20_000
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY, name text, qty int)")
    conn.execute(
        "INSERT INTO app.big SELECT g, 'item ' || g, g %% 100 FROM generate_series(1, %s) g", [BIG_ROWS]
    )
    conn.execute("VACUUM ANALYZE app.big")
    threadline.ddl.track(conn, "app.big")
    env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    command = [sys.executable, "-m", "threadline.cli", "baseline", "app.big", "--batch-size", str(batch)]
    proc = subprocess.Popen(
        [*command, "--actor", "user:1"],
        env={**env, "THREADLINE_DSN": dsn},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            row = conn.execute("SELECT rows_done FROM threadline.baselines").fetchone()
            done = row[0] if row else 0
            if done >= 3 * batch:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 3 * batch <= done < BIG_ROWS
    (stopped,) = threadline.baselines(conn)
    assert stopped.finished_at is None and stopped.rows < BIG_ROWS
    # a batch commits its snapshots and its progress together, or neither
    snapshots = conn.execute("SELECT count(*) FROM threadline.changes WHERE op = 'snapshot'").fetchone()
    assert snapshots is not None and snapshots[0] == threadline.baselines(conn)[0].rows
    assert _baseline_of(health.coverage(conn, schemas=["app"])) == {"big": "in progress"}

    res = run(
        "baseline", "app.big", "--batch-size", str(batch), "--actor", "user:2", env={"THREADLINE_DSN": dsn}
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"baseline of app.big: complete, {BIG_ROWS} rows\n"
    # each batch starts at the last key through the primary key's index: the index entries read
    # add up to the table once, not to the rows before each batch over and over
    read = 0
    deadline = time.monotonic() + 10
    while read < BIG_ROWS and time.monotonic() < deadline:  # the servers' statistics come in late
        row = conn.execute(
            "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelid = 'app.big_pkey'::regclass"
        ).fetchone()
        read = row[0] if row else 0
        time.sleep(0.05)
    assert BIG_ROWS <= read < 1.2 * BIG_ROWS
    # as many snapshots as rows, each of another row of the table, all of them one transaction's:
    # the snapshots' keys are the table's keys
    conn.execute("SET work_mem = '256MB'")
    counts = conn.execute(
        "SELECT count(*), count(DISTINCT s.id), count(b.id), count(DISTINCT s.transaction_id)"
        "  FROM (SELECT (c.pk ->> 'id')::int AS id, c.transaction_id FROM threadline.changes c"
        "         WHERE c.op = 'snapshot' AND c.table_schema = 'app' AND c.table_name = 'big') s"
        "  LEFT JOIN app.big b ON b.id = s.id"
    ).fetchone()
    assert counts == (BIG_ROWS, BIG_ROWS, BIG_ROWS, 1)
    assert conn.execute("SELECT count(*) FROM app.big").fetchone() == (BIG_ROWS,)
    assert conn.execute("SELECT count(*) FROM threadline.changes WHERE pk - 'id' <> '{}'").fetchone() == (0,)
    (finished,) = threadline.baselines(conn)
    assert finished.rows == BIG_ROWS and finished.finished_at is not None
    (tx,) = [t for t in transactions(conn) if t["meta"] and "baseline" in t["meta"]]
    # the baseline's transaction row is the first run's: who began it
    assert tx["actor"] == {"type": "user", "id": "1"} and tx["origin"] == "cli"
    assert tx["meta"] == {"command": "baseline", "baseline": "app.big"}


# ---------------------------------------------------------------------------------------------
# The table as it was


def test_writes_during_a_baseline_are_shown_as_they_were(conn: Conn, dsn: str) -> None:
    table = "app.stock"
    conn.execute("CREATE TABLE app.stock (id int PRIMARY KEY, name text, qty int)")
    conn.execute("INSERT INTO app.stock SELECT g, 'item ' || g, g FROM generate_series(1, 60) g")
    threadline.ddl.track(conn, table)
    moments: list[Moment] = []
    steps: list[BaselineProgress] = []
    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(dsn) as pending:
        other.execute("UPDATE app.stock SET qty = qty + 100 WHERE id IN (2, 42)")  # before the baseline
        before = _moment(other, table)

        def step(progress: BaselineProgress) -> None:
            steps.append(progress)
            if len(steps) == 1:  # rows 1-10 recorded
                moments.append(_moment(other, table))
                other.execute("UPDATE app.stock SET qty = -5 WHERE id = 5")  # recorded already
                other.execute("UPDATE app.stock SET name = 'renamed' WHERE id = 25")  # not yet
                other.execute("DELETE FROM app.stock WHERE id IN (3, 30)")
                other.execute("INSERT INTO app.stock VALUES (-1, 'early', 1), (100, 'late', 1)")
                moments.append(_moment(other, table))
            elif len(steps) == 2:  # rows up to 20 recorded
                other.execute("UPDATE app.stock SET qty = qty * 2 WHERE id BETWEEN 18 AND 22")
                other.execute("UPDATE app.stock SET qty = qty * 2 WHERE id BETWEEN 18 AND 22")
                other.execute("DELETE FROM app.stock WHERE id = 19")
                other.execute("INSERT INTO app.stock VALUES (19, 'again', 19)")
                moments.append(_moment(other, table))
                # open while the batch of rows 41-50 reads row 45 (no time is sampled meanwhile:
                # a change counts from its capture, not its commit): the snapshot has the old value
                pending.execute("UPDATE app.stock SET qty = 999 WHERE id = 45")
            elif len(steps) == 5:  # rows up to 50 recorded
                pending.commit()
                moments.append(_moment(other, table))
                other.execute("UPDATE app.stock SET name = 'moved' WHERE id = 55")
                moments.append(_moment(other, table))

        with threadline.context(actor=ActorRef.user("3")):
            result = threadline.take_baseline(conn, table, batch_size=10, progress=step)
    assert result.finished and len(steps) == 7
    # the row read while its change was uncommitted: the snapshot is older than its time
    (snapshot_45,) = [c for c in _snapshots(conn, "stock") if c["pk"] == {"id": 45}]
    assert snapshot_45["after"]["qty"] == 45
    assert len(_snapshots(conn, "stock")) == 60  # 1-60 but 30, with 100
    conn.execute("UPDATE app.stock SET name = 'after' WHERE id = 1")
    conn.execute("DELETE FROM app.stock WHERE id IN (60, 100)")
    conn.execute("INSERT INTO app.stock VALUES (61, 'new', 1)")
    moments.append(_moment(conn, table))
    conn.execute("UPDATE app.stock SET qty = 0")
    moments.append(_moment(conn, table))

    with pytest.raises(NoBaseline, match="after that time"):
        threadline.as_of(conn, table, at=before[0])
    assert threadline.as_of(conn, table, 2, before[0]) == before[1][1]  # captured before the baseline
    with pytest.raises(
        NotYetAudited,
        match=r"has no captured change at or before .*: its earliest captured change is an update",
    ):
        threadline.as_of(conn, table, 1, before[0])
    with pytest.raises(NotYetAudited, match="its earliest captured change is a delete at"):
        threadline.as_of(conn, table, 30, before[0])
    for moment in moments:
        _assert_as_of(conn, table, moment, (-1, 1, 2, 3, 5, 18, 19, 20, 22, 25, 30, 42, 45, 55, 60, 61, 100))


def test_table_as_of_needs_a_complete_baseline_in_force(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.t SELECT g, 'v' || g FROM generate_series(1, 5) g")
    threadline.ddl.track(conn, "app.t")
    earlier = _now(conn)
    with pytest.raises(NoBaseline, match=r"^app\.t cannot be shown as it was at .*: it has no baseline"):
        threadline.as_of(conn, "app.t", at=earlier)
    with pytest.raises(Stop):
        threadline.take_baseline(conn, "app.t", batch_size=2, progress=_interrupt_after(1))
    with pytest.raises(NoBaseline, match="its baseline is not complete: take it again to finish it"):
        threadline.as_of(conn, "app.t", at=_now(conn))
    # one row at a time: what the unfinished baseline has recorded is known
    assert threadline.as_of(conn, "app.t", 1, _now(conn)) == {"id": 1, "v": "v1"}
    with pytest.raises(NotYetAudited, match="had not reached it"):
        threadline.as_of(conn, "app.t", 5, _now(conn))
    threadline.take_baseline(conn, "app.t", batch_size=2)
    now = _now(conn)
    assert [r["id"] for r in _table(conn, "app.t", now)] == [1, 2, 3, 4, 5]
    with pytest.raises(NoBaseline, match=r"its baseline was taken at .*, after that time"):
        threadline.as_of(conn, "app.t", at=earlier)
    with pytest.raises(NotYetAudited, match="baseline has no such row"):
        threadline.as_of(conn, "app.t", 6, now)
    with pytest.raises(threadline.core.errors.InvalidFilter, match="naive"):
        threadline.as_of(conn, "app.t", at=now.replace(tzinfo=None))


def test_table_as_of_after_deletes_inserts_and_a_truncate(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.t SELECT g, 'v' || g FROM generate_series(1, 4) g")
    threadline.ddl.track(conn, "app.t")
    threadline.take_baseline(conn, "app.t")
    moments = [_moment(conn, "app.t")]
    conn.execute("DELETE FROM app.t WHERE id = 2")
    moments.append(_moment(conn, "app.t"))
    conn.execute("INSERT INTO app.t VALUES (5, 'v5')")
    moments.append(_moment(conn, "app.t"))
    conn.execute("TRUNCATE app.t")
    truncated = _moment(conn, "app.t")
    moments.append(truncated)
    conn.execute("INSERT INTO app.t VALUES (7, 'v7'), (1, 'one again')")
    moments.append(_moment(conn, "app.t"))
    conn.execute("UPDATE app.t SET v = 'later' WHERE id = 7")
    moments.append(_moment(conn, "app.t"))
    for moment in moments:
        _assert_as_of(conn, "app.t", moment, range(1, 8))
    assert [r["id"] for r in moments[1][1]] == [1, 3, 4] and moments[2][1][-1]["id"] == 5
    # a row the truncate removed and an insert brought back: before both, the baseline's row
    assert threadline.as_of(conn, "app.t", 1, moments[0][0]) == {"id": 1, "v": "v1"}
    assert truncated[1] == []
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.t", 3, truncated[0])
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.t", 5, truncated[0])
    with pytest.raises(RowDeleted, match="was deleted at"):
        threadline.as_of(conn, "app.t", 2, moments[1][0])
    with pytest.raises(NotYetAudited, match="did not exist"):
        threadline.as_of(conn, "app.t", 5, moments[1][0])
    assert threadline.as_of(conn, "app.t", 1, moments[-1][0]) == {"id": 1, "v": "one again"}


def test_table_as_of_of_a_composite_key_is_in_key_order(conn: Conn) -> None:
    conn.execute(
        "CREATE TABLE app.lines (order_id int, line_no int, sku text, qty int, PRIMARY KEY (order_id, line_no))"
    )
    conn.execute(
        "INSERT INTO app.lines SELECT o, l, 'sku-' || o || '-' || l, l"
        " FROM unnest(ARRAY[1, 2, 10]) o, unnest(ARRAY[1, 2, 10, 11]) l"
    )
    threadline.ddl.track(conn, "app.lines")
    threadline.take_baseline(conn, "app.lines", batch_size=5)
    snapshots = [(c["pk"]["order_id"], c["pk"]["line_no"]) for c in _snapshots(conn, "lines")]
    assert snapshots == sorted(snapshots) and len(snapshots) == 12
    conn.execute("UPDATE app.lines SET qty = 0 WHERE (order_id, line_no) = (2, 10)")
    conn.execute("DELETE FROM app.lines WHERE (order_id, line_no) = (1, 1)")
    conn.execute("INSERT INTO app.lines VALUES (10, 3, 'new', 1), (3, 20, 'new', 1)")
    at, rows = _moment(conn, "app.lines", "order_id, line_no")
    assert _table(conn, "app.lines", at) == rows  # in (order_id, line_no) order
    assert threadline.as_of(conn, "app.lines", {"order_id": 2, "line_no": 10}, at)["qty"] == 0
    assert threadline.as_of(conn, "app.lines", (10, 11), at)["sku"] == "sku-10-11"
    with pytest.raises(RowDeleted):
        threadline.as_of(conn, "app.lines", (1, 1), at)


def test_table_as_of_follows_a_renamed_table(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.old_name (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.old_name SELECT g, 'v' || g FROM generate_series(1, 4) g")
    threadline.ddl.track(conn, "app.old_name")
    threadline.take_baseline(conn, "app.old_name", batch_size=3)
    conn.execute("UPDATE app.old_name SET v = 'before rename' WHERE id = 1")
    before = _moment(conn, "app.old_name")
    conn.execute("ALTER TABLE app.old_name RENAME TO new_name")
    conn.execute("UPDATE app.new_name SET v = 'after rename' WHERE id = 2")
    conn.execute("DELETE FROM app.new_name WHERE id = 3")
    at, rows = _moment(conn, "app.new_name")
    _assert_as_of(conn, "app.new_name", (at, rows), range(1, 6))
    _assert_as_of(conn, "app.new_name", before, range(1, 6))
    assert threadline.as_of(conn, "app.new_name", 4, at) == {"id": 4, "v": "v4"}
    assert threadline.as_of(conn, "app.new_name", 1, at) == {"id": 1, "v": "before rename"}
    assert _baseline_of(health.coverage(conn, schemas=["app"])) == {"new_name": "complete"}
    again = threadline.take_baseline(conn, "app.new_name")
    assert (again.batch_rows, again.rows, again.table) == (0, 4, "app.new_name")


def test_a_closed_stream_gives_the_connection_back(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
    threadline.ddl.track(conn, "app.t")
    threadline.take_baseline(conn, "app.t")
    with contextlib.closing(threadline.as_of(conn, "app.t", at=_now(conn))) as rows:
        assert next(rows)["id"] == 1
    assert conn.execute("SELECT count(*) FROM app.t").fetchone() == (5000,)


def test_as_of_async_gives_the_same_rows(conn: Conn, dsn: str) -> None:
    conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.t SELECT g, 'v' || g FROM generate_series(1, 30) g")
    threadline.ddl.track(conn, "app.t")
    threadline.take_baseline(conn, "app.t", batch_size=7)
    conn.execute("UPDATE app.t SET v = 'changed' WHERE id % 3 = 0")
    conn.execute("DELETE FROM app.t WHERE id > 25")
    at, rows = _moment(conn, "app.t")
    conn.execute("CREATE TABLE app.fresh (id int PRIMARY KEY)")
    threadline.ddl.track(conn, "app.fresh")

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            streamed = [row async for row in await threadline.as_of_async(aconn, "app.t", at=at)]
            one = await threadline.as_of_async(aconn, "app.t", 3, at)
            with pytest.raises(NoBaseline, match="no baseline"):
                await threadline.as_of_async(aconn, "app.fresh", at=at)
            with pytest.raises(RowDeleted):
                await threadline.as_of_async(aconn, "app.t", 30, at)
            return streamed, one

    streamed, one = asyncio.run(main())
    assert streamed == rows == _table(conn, "app.t", at)
    assert one == {"id": 3, "v": "changed"}


# ---------------------------------------------------------------------------------------------
# The command line and SQL


def test_cli_track_baseline_and_as_of(conn: Conn, dsn: str) -> None:
    env = {"THREADLINE_DSN": dsn}
    conn.execute("CREATE TABLE app.orders (id int PRIMARY KEY, card text, note text, total int, tags jsonb)")
    conn.execute(
        "INSERT INTO app.orders SELECT g, '4111-' || g, 'note, \"quoted\" ' || g, g, jsonb_build_object('n', g)"
        " FROM generate_series(1, 3000) g"
    )
    res = run(
        "track",
        "app.orders",
        "--mask",
        "card",
        "--baseline",
        "--batch-size",
        "1000",
        "--actor",
        "user:9",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("baseline of app.orders: complete, 3000 rows\n")
    (tx,) = [t for t in transactions(conn) if t["meta"] and "baseline" in t["meta"]]
    assert tx["meta"] == {"command": "track", "baseline": "app.orders"}
    assert (tx["actor"], tx["origin"]) == ({"type": "user", "id": "9"}, "cli")
    recorded = len(changes(conn))
    res = run("baseline", "app.orders", env=env)
    assert (res.returncode, res.stdout) == (0, "baseline of app.orders: complete, 3000 rows\n")
    assert len(changes(conn)) == recorded
    conn.execute("UPDATE app.orders SET total = 0, note = 'x' WHERE id = 1")
    conn.execute("DELETE FROM app.orders WHERE id = 2")

    res = run("as-of", "app.orders", "--at", "now", "--format", "csv", env=env)
    assert res.returncode == 0, res.stderr
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(table) == 2999 and [r["id"] for r in table[:2]] == ["1", "3"]
    assert table[0] == {"id": "1", "card": "[masked]", "note": "x", "total": "0", "tags": '{"n": 1}'}
    assert table[1]["note"] == 'note, "quoted" 3'
    res = run("as-of", "app.orders", "--at", "now", env=env)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines == _table(conn, "app.orders", _now(conn))
    assert lines[0] == {"id": 1, "card": "[masked]", "note": "x", "total": 0, "tags": {"n": 1}}

    # `| head -1`: the reader goes away after one line; the command ends quietly, at once
    proc = subprocess.Popen(
        [sys.executable, "-m", "threadline.cli", "as-of", "app.orders", "--at", "now"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    try:
        returncode = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert json.loads(first)["id"] == 1
    assert returncode == 0 and proc.stderr.read() == b""

    conn.execute("CREATE TABLE app.fresh (id int PRIMARY KEY)")
    threadline.ddl.track(conn, "app.fresh")
    res = run("as-of", "app.fresh", "--at", "now", env=env)
    assert (res.returncode, res.stdout) == (1, "")
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("Error: app.fresh cannot be shown as it was at ") and "has no baseline" in line
    res = run("baseline", "app.nope", env=env)
    assert res.returncode == 2 and "not found" in res.stderr


def test_sql_procedure_takes_a_baseline_outside_a_transaction_block(conn: Conn, dsn: str) -> None:
    for name in ("t", "u"):
        conn.execute(f"CREATE TABLE app.{name} (id int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO app.{name} SELECT g, 'v' || g FROM generate_series(1, 2500) g")
        threadline.ddl.track(conn, f"app.{name}")
    statement = baseline_sql("app.t", batch_size=1000)
    assert statement == """CALL "threadline".take_baseline('"app"."t"'::regclass, 1000);\n"""
    conn.execute(statement)
    (baseline,) = threadline.baselines(conn)
    assert (baseline.table_name, baseline.rows) == ("t", 2500) and baseline.finished_at is not None
    counts = conn.execute(
        "SELECT count(*), count(DISTINCT pk), count(DISTINCT transaction_id) FROM threadline.changes"
        " WHERE op = 'snapshot' AND table_name = 't'"
    ).fetchone()
    assert counts == (2500, 2500, 1)
    (tx,) = transactions(conn)
    assert tx["meta"] == {"baseline": "app.t"}

    # in a transaction block the procedure cannot commit its batches: PostgreSQL refuses it
    with psycopg.connect(dsn) as in_block, pytest.raises(psycopg.errors.InvalidTransactionTermination):
        in_block.execute("CALL threadline.take_baseline('app.u', 1000)")
    assert [b.table_name for b in threadline.baselines(conn)] == ["t"]
    res = run("track", "app.u", "--baseline", "--batch-size", "500", "--print-sql")
    assert res.stdout.endswith("""CALL "threadline".take_baseline('"app"."u"'::regclass, 500);\n""")


def test_a_baseline_needs_unique_keys(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.lines (order_id int, line int, qty int)")
    conn.execute("INSERT INTO app.lines SELECT g / 3, g % 3, 1 FROM generate_series(1, 10) g")
    threadline.ddl.track(conn, "app.lines", keys=["order_id"])
    with pytest.raises(threadline.TrackingError, match="not unique"):
        threadline.take_baseline(conn, "app.lines", batch_size=2)
    conn.execute("CREATE UNIQUE INDEX ON app.lines (order_id, line)")
    conn.execute("ALTER TABLE app.lines ALTER COLUMN order_id SET NOT NULL, ALTER COLUMN line SET NOT NULL")
    threadline.ddl.track(conn, "app.lines", keys=["order_id", "line"])
    assert threadline.take_baseline(conn, "app.lines", batch_size=2).rows == 10


def test_a_unique_index_over_columns_that_may_be_null_is_no_unique_key(
    conn: psycopg.Connection[Any],
) -> None:
    # any number of rows may share a key holding a NULL, and a batch after such a key skips the
    # rows that follow it: a baseline would be complete without them
    conn.execute("CREATE TABLE app.pairs (a int, b int, v text, UNIQUE (a, b))")
    conn.execute("INSERT INTO app.pairs VALUES (1, 1, 'x'), (1, NULL, 'y'), (1, NULL, 'z'), (2, 2, 'w')")
    assert not threadline.ddl.track(conn, "app.pairs", keys=["a", "b"]).keys_unique
    with pytest.raises(threadline.TrackingError, match="not unique"):
        threadline.take_baseline(conn, "app.pairs", batch_size=1)
    conn.execute("DELETE FROM app.pairs WHERE b IS NULL")
    conn.execute("ALTER TABLE app.pairs ALTER COLUMN a SET NOT NULL, ALTER COLUMN b SET NOT NULL")
    assert threadline.ddl.track(conn, "app.pairs", keys=["a", "b"]).keys_unique
    assert threadline.take_baseline(conn, "app.pairs", batch_size=1).rows == 2


def test_snapshots_are_found_by_their_op(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.few (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO app.few VALUES (1, 'a'), (2, 'b')")
    threadline.ddl.track(conn, "app.few")
    threadline.take_baseline(conn, "app.few")
    conn.execute("UPDATE app.few SET v = 'c' WHERE id = 1")
    page = threadline.timeline(conn, table="app.few", op="snapshot")
    assert [(c.op, c.pk) for c in page] == [("snapshot", {"id": 1}), ("snapshot", {"id": 2})]
    assert [c.op for c in threadline.history(conn, "app.few", 1)] == ["update", "snapshot"]  # newest first
