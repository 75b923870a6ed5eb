"""Faults under real workers: a worker SIGKILLed mid-task, database connections terminated
while tasks run, Redis broker connections dropped mid-run.

The shared PostgreSQL and Redis servers are never restarted (other test runs use them): a
PostgreSQL restart is simulated by ``pg_terminate_backend`` on every connection of the worker
(what a restart does to them), and a Redis restart by ``CLIENT KILL`` of this session's broker
connections (the clients of its database number).

Without a Redis or RabbitMQ server (``tests/brokers.py``), the database fault runs on the filesystem
fallback; the two broker faults are skipped, naming the missing server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import threadline
from threadline import ActorRef

from . import brokers
from .celery_app import tasks
from .celery_app.harness import Worker, env_var, setup_events_table, wait_row_list, wait_rows

FAULT_TASKS = "tests.celery_app.fault_tasks"
APP_NAME = "threadline-fault-worker"


@pytest.fixture(scope="module")
def celery_dsn(database: str) -> Iterator[str]:
    setup_events_table(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


def _worker(
    broker: str, pool: str, dsn: str, tmp: Path, *, queue_of: Worker | None = None, concurrency: int = 2
) -> Worker:
    worker = Worker(
        broker,
        pool,
        psycopg.conninfo.make_conninfo(dsn, application_name=APP_NAME),
        tmp,
        concurrency=concurrency,
    )
    worker.args += ["-I", FAULT_TASKS]
    if queue_of is not None:  # consume the same queue as another worker
        worker.queue = queue_of.queue
        worker.env["THREADLINE_TEST_CELERY_QUEUE"] = worker.queue
        worker.args[worker.args.index("-Q") + 1] = worker.queue
    return worker


def _send(app: Any, name: str, label: str, *args: Any) -> None:
    with threadline.context(
        actor=ActorRef.user("5"), correlation_id=f"corr-{label}", request_id=label, origin="web"
    ):
        app.send_task(f"{FAULT_TASKS}.{name}", args=[label, *args])


def _orphans(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM threadline.changes c LEFT JOIN threadline.transactions t ON t.id = c.transaction_id"
            " WHERE t.id IS NULL"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_sigkill_mid_task_redelivers_with_the_original_context(celery_dsn: str, tmp_path: Path) -> None:
    brokers.require_server("amqp", "the filesystem transport never redelivers a killed worker's message")
    first = _worker("amqp", "prefork", celery_dsn, tmp_path, concurrency=1).start()
    second = _worker("amqp", "prefork", celery_dsn, tmp_path, queue_of=first, concurrency=1)
    try:
        app = first.app()
        label = f"kill-{uuid.uuid4().hex[:8]}"
        marker = tmp_path / f"{label}.started"
        _send(app, "hold_then_write", label, str(marker))
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, first.log()[-3000:]
            time.sleep(0.05)
        killed_pid = int(marker.read_text())
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)  # the worker and its pool child, mid-transaction
        first.proc.wait(10)
        second.start()  # RabbitMQ redelivers the unacknowledged message
        rows = wait_row_list(celery_dsn, label, 1, worker=second, settle=0.5)
    finally:
        first.stop()
        second.stop()
    assert len(rows) == 1  # the killed attempt's uncommitted insert left no audit rows
    row = rows[0]
    assert row["pid"] != killed_pid
    assert row["actor"] == {"type": "user", "id": "5"} and row["correlation_id"] == f"corr-{label}"
    assert row["request_id"] == label and row["context_error"] is None
    assert _orphans(celery_dsn) == 0


def test_terminated_database_connections_retry_cleanly(celery_dsn: str, tmp_path: Path) -> None:
    worker = _worker("redis", "threads", celery_dsn, tmp_path, concurrency=4).start()
    labels = [f"term-{uuid.uuid4().hex[:8]}-{i:02d}" for i in range(12)]
    terminated = 0
    try:
        app = worker.app()
        for label in labels:
            _send(app, "slow_write", label, 0.3)
        with psycopg.connect(celery_dsn, autocommit=True) as admin:
            for _ in range(8):  # what a PostgreSQL restart does to the worker's connections
                time.sleep(0.25)
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                    [APP_NAME],
                ).fetchone()
                terminated += row[0] if row else 0
        found = {label: wait_rows(celery_dsn, label, 1, worker=worker, timeout=60)[label] for label in labels}
        time.sleep(0.5)
        # every task committed exactly once, with its own request's context
        for label in labels:
            again = wait_row_list(celery_dsn, label, 1, worker=worker)
            assert len(again) == 1, again
            assert found[label]["correlation_id"] == f"corr-{label}" and found[label]["request_id"] == label
            assert found[label]["actor"] == {"type": "user", "id": "5"}
    finally:
        worker.stop()
    assert terminated > 0  # the faults really happened
    assert "OperationalError" in worker.log() or "Retry" in worker.log()
    assert _orphans(celery_dsn) == 0


def _kill_session_clients(url: str) -> int:
    """CLIENT KILL every connection of this session's Redis database number but ours."""
    client = redis.Redis.from_url(url)
    try:
        me = client.client_id()
        db = client.connection_pool.connection_kwargs.get("db", 0)
        killed = 0
        for info in client.client_list():
            if int(info["db"]) == db and int(info["id"]) != me:
                killed += int(client.execute_command("CLIENT", "KILL", "ID", info["id"]))
        return killed
    finally:
        client.close()


def test_redis_connections_dropped_mid_run_keep_headers(celery_dsn: str, tmp_path: Path) -> None:
    redis_url = brokers.require_server("redis", "drops Redis client connections with CLIENT KILL").url
    worker = _worker("redis", "threads", celery_dsn, tmp_path).start()
    try:
        app = worker.app()
        before = [f"redis-before-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
        after = [f"redis-after-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
        for label in before:
            _send(app, "slow_write", label, 0.0)
        for label in before:
            wait_rows(celery_dsn, label, 1, worker=worker)
        assert _kill_session_clients(redis_url) >= 2  # the worker's and the producer's connections
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                for label in after:
                    _send(app, "slow_write", label, 0.0)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=publish)  # a fresh thread: its context is empty until _send sets it
        t.start()
        t.join(60)
        assert not errors, errors
        rows = {label: wait_rows(celery_dsn, label, 1, worker=worker, timeout=60)[label] for label in after}
    finally:
        worker.stop()
    for label, row in rows.items():
        assert row["correlation_id"] == f"corr-{label}" and row["request_id"] == label
        assert row["actor"] == {"type": "user", "id": "5"} and row["context_error"] is None


def _private_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            if redis.Redis(port=port).ping():
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("redis-server did not start")


@pytest.mark.parametrize("outage", [1.0, 8.0])
def test_a_prefork_worker_without_heartbeat_consumes_again_after_the_redis_broker_restarts(
    celery_dsn: str, tmp_path: Path, outage: float
) -> None:
    # its own redis-server on a free port: the shared one is never restarted
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _private_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    worker = _worker("redis", "prefork", celery_dsn, tmp_path)
    worker.broker = url
    worker.env["THREADLINE_TEST_CELERY_BROKER"] = url
    worker.start()  # started with --without-heartbeat, as the report had it
    try:
        app = worker.app()
        label = f"restart-{uuid.uuid4().hex[:8]}"
        _send(app, "slow_write", f"{label}-before", 0.0)
        wait_rows(celery_dsn, f"{label}-before", 1, worker=worker)
        server.terminate()
        server.wait(10)
        time.sleep(outage)
        server = _private_redis(port)
        _send(app, "slow_write", f"{label}-after", 0.0)  # the producer reconnects on its own
        row = wait_rows(celery_dsn, f"{label}-after", 1, worker=worker, timeout=90)[f"{label}-after"]
        assert row["actor"] == {"type": "user", "id": "5"} and row["request_id"] == f"{label}-after"
        assert "Connection to broker lost" in worker.log()
    finally:
        worker.stop()
        server.kill()
        server.wait(10)
