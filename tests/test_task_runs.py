"""The task-run recorder against the real database: batches, a database that is away, rows the
table refuses, forks.

The worker-side behaviour (every Celery path, both pools, both brokers) is covered by
``test_celery_paths.py``, whose workers all record their runs.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest

from threadline.core.errors import ConfigurationError
from threadline.propagation.task_runs import COLUMNS, TaskRunRecorder

Conn = psycopg.Connection[Any]


def _row(task_id: str, attempt: int = 0, outcome: str = "succeeded") -> tuple[Any, ...]:
    now = datetime.now(timezone.utc)
    values = {
        "task_id": task_id,
        "name": "shop.charge",
        "attempt": attempt,
        "outcome": outcome,
        "error": None,
        "correlation_id": "req-1",
        "causation_id": None,
        "parent_id": None,
        "root_id": task_id,
        "actor": '{"type": "user", "id": "7"}',
        "worker": "w1@host",
        "started_at": now,
        "ended_at": now,
    }
    return tuple(values[c] for c in COLUMNS)


def _ids(conn: Conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT task_id FROM threadline.task_runs ORDER BY id").fetchall()]


def _wait(conn: Conn, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = _ids(conn)
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


def test_rows_are_written_in_the_background_in_order(conn: Conn, dsn: str) -> None:
    recorder = TaskRunRecorder(dsn, flush_interval=0.05)
    try:
        for i in range(2500):  # more than one COPY batch
            recorder.record(_row(f"t{i}"))
        ids = _wait(conn, 2500)
        assert ids == [f"t{i}" for i in range(2500)]
        row = conn.execute("SELECT actor, outcome, worker FROM threadline.task_runs LIMIT 1").fetchone()
        assert row == ({"type": "user", "id": "7"}, "succeeded", "w1@host")
    finally:
        assert recorder.close()


def test_a_database_that_is_away_delays_the_rows_and_never_raises(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    reachable = {"now": False}

    def connect() -> Conn:
        if not reachable["now"]:
            return psycopg.connect(dsn, port=1, connect_timeout=1)  # nothing listens there
        return psycopg.connect(dsn)

    recorder = TaskRunRecorder(connect, flush_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="threadline.celery"):
        for i in range(5):
            recorder.record(_row(f"away{i}"))
        time.sleep(0.5)
        assert _ids(conn) == []
        assert any("not being recorded (5 waiting)" in r.getMessage() for r in caplog.records)
        reachable["now"] = True
        assert _wait(conn, 5) == [f"away{i}" for i in range(5)]
        time.sleep(0.2)
        assert any("recorded again" in r.getMessage() for r in caplog.records)
    assert recorder.close()


def test_more_rows_than_max_pending_drop_the_oldest(conn: Conn, dsn: str) -> None:
    recorder = TaskRunRecorder(lambda: psycopg.connect(dsn, port=1, connect_timeout=1), max_pending=3)
    for i in range(5):
        recorder.record(_row(f"p{i}"))
    assert recorder.dropped == 2
    assert not recorder.close()  # the database never took them
    assert _ids(conn) == []


def test_a_forked_child_writes_its_own_rows_only(conn: Conn, dsn: str) -> None:
    recorder = TaskRunRecorder(dsn, flush_interval=0.05)
    recorder.record(_row("parent"))
    assert _wait(conn, 1) == ["parent"]
    recorder.record(_row("parent-late"))  # queued in the parent when it forks
    pid = os.fork()
    if pid == 0:  # the child: record, flush, leave without running the parent's cleanup
        code = 1
        try:
            recorder.record(_row("child"))
            code = 0 if recorder.close() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert recorder.close()
    assert sorted(_ids(conn)) == ["child", "parent", "parent-late"]


def test_a_row_the_table_refuses_is_left_out_and_the_rows_beside_it_are_written(
    conn: Conn, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = TaskRunRecorder(dsn, flush_interval=60)  # flushed by hand below
    bad = [
        _row("no-number", attempt="three"),  # type: ignore[arg-type]  # refused by the COPY's client side
        _row("nul\x00in-id"),  # refused by the server
        ("short",),  # not a row at all
    ]
    with caplog.at_level(logging.ERROR, logger="threadline.celery"):
        recorder.record(_row("before"))
        for row in bad:
            recorder.record(row)
        recorder.record(_row("after", attempt=2**40))  # out of int4: recorded at its bound
        assert recorder.flush()
    assert _ids(conn) == ["before", "after"] and recorder.rejected == 3
    attempts = conn.execute("SELECT attempt FROM threadline.task_runs ORDER BY id").fetchall()
    assert attempts == [(0,), (2**31 - 1,)]
    left_out = [r.getMessage() for r in caplog.records if "cannot be recorded" in r.getMessage()]
    assert len(left_out) == 3 and "task shop.charge[no-number]" in left_out[0]
    recorder.record(_row("later"))
    assert recorder.close() and _ids(conn) == ["before", "after", "later"]


def test_a_recorder_no_longer_used_is_freed() -> None:
    import gc
    import weakref

    recorder = TaskRunRecorder("postgresql://")
    gone = weakref.ref(recorder)
    del recorder
    gc.collect()
    assert gone() is None  # its fork hook does not keep it


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="DSN or a function"):
        TaskRunRecorder(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="flush_interval"):
        TaskRunRecorder("postgresql://", flush_interval=0)
    with pytest.raises(ConfigurationError, match="max_pending"):
        TaskRunRecorder("postgresql://", max_pending=0)
    with pytest.raises(Exception, match="audit schema name"):
        TaskRunRecorder("postgresql://", audit_schema="Bad Name")
