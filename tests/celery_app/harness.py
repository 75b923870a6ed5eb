"""Real brokers and real ``celery worker`` subprocesses for the Celery tests.

Brokers: Redis (``THREADLINE_TEST_REDIS``, default a per-session db number on 127.0.0.1:6379)
and RabbitMQ (``THREADLINE_TEST_AMQP``), each replaced by kombu's server-less filesystem
transport when its server does not answer at the start of the session (``tests/brokers.py``
decides, once). A broker that answered and then stops answering fails the tests: never skipped.
Each worker consumes a queue named uniquely for this test session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Producer

import threadline
from tests import brokers

ROOT = Path(__file__).resolve().parents[2]
SESSION = uuid.uuid4().hex[:8]
BROKERS = {kind: chosen.url for kind, chosen in brokers.choice().brokers.items()}
BACKEND_URL = brokers.choice().backend  # chords need a result backend: one for both brokers

EVENTS_DDL = """
CREATE SCHEMA IF NOT EXISTS celery_t;
CREATE TABLE IF NOT EXISTS celery_t.events (id text PRIMARY KEY, label text NOT NULL, pid int, thread text);
"""

ROWS_SQL = """
SELECT c.after->>'label' AS label, (c.after->>'pid')::int AS pid, c.after->>'thread' AS thread,
       t.actor, t.correlation_id, t.request_id, t.causation_id, t.origin, t.job, t.context_error
  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
 WHERE c.table_schema = 'celery_t' AND c.table_name = 'events' AND c.after->>'label' LIKE %s
 ORDER BY c.id
"""


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set one environment variable (read by in-process tasks) and restore what was there."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def require_broker(url: str) -> None:
    """Fail loudly (never skip) when the broker cannot be reached."""
    try:
        with brokers.connection(url) as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.5)
    except Exception as exc:
        pytest.fail(
            f"broker {url} answered at the start of the session but is not reachable now ({exc!r}): "
            "restart it, or point THREADLINE_TEST_REDIS / THREADLINE_TEST_AMQP at one",
            pytrace=False,
        )


def setup_events_table(dsn: str) -> None:
    """Create and track ``celery_t.events`` (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EVENTS_DDL)
        threadline.ddl.track(conn, "celery_t.events")


class Worker:
    """A ``celery worker`` subprocess with its own queue and log file."""

    def __init__(
        self,
        broker: str,
        pool: str,
        dsn: str,
        tmp: Path,
        *,
        concurrency: int = 2,
        signing_keys: list[str] | None = None,
    ) -> None:
        self.broker_name = broker
        self.server = brokers.broker(broker)
        self.broker = self.server.url  # the filesystem fallback's URL when the server did not answer
        self.pool = pool
        self.queue = f"threadline-test-{SESSION}-{broker}-{pool}-{uuid.uuid4().hex[:6]}"
        self.log_path = tmp / f"{self.queue}.log"
        # os.environ carries THREADLINE_TEST_CELERY_FS_ROOT: the fallback's folders, shared with the worker
        self.env = dict(
            os.environ,
            THREADLINE_TEST_CELERY_BROKER=self.broker,
            THREADLINE_TEST_CELERY_BACKEND=BACKEND_URL,
            THREADLINE_TEST_CELERY_QUEUE=self.queue,
            THREADLINE_TEST_CELERY_DSN=dsn,
            PYTHONPATH=str(ROOT),
        )
        if signing_keys:
            self.env["THREADLINE_TEST_CELERY_SIGNING_KEYS"] = ",".join(signing_keys)
        self.args = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app.worker", "worker",
            "-P", pool, "-c", str(concurrency), "-Q", self.queue,
            "-n", f"{self.queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "INFO",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[subprocess.Popen[bytes]] = []

    def start(self) -> Worker:
        """Start the worker and wait until it says it is ready."""
        require_broker(self.broker)
        self.proc = self._spawn(self.args, self.log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"celery worker did not start:\n{self.log()[-4000:]}")

    def start_beat(
        self, label: str, tmp: Path, headers: dict[str, Any] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``celery beat`` publishing ``beat_tick(label)`` to this worker's queue (with
        these message headers, the entry's ``headers`` option)."""
        env_extra = {
            "THREADLINE_TEST_CELERY_BEAT_LABEL": label,
            "THREADLINE_TEST_CELERY_BEAT_HEADERS": json.dumps(headers or {}),
        }
        args = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app.worker", "beat",
            "-s", str(tmp / f"beat-{self.queue}"), "-l", "INFO", "--max-interval", "1",
        ]  # fmt: skip
        proc = self._spawn(args, tmp / f"beat-{self.queue}.log", env_extra)
        self.extra.append(proc)
        return proc

    def _spawn(
        self, args: list[str], log: Path, env_extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                args,
                cwd=ROOT,
                env={**self.env, **(env_extra or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @staticmethod
    def stop_process(proc: subprocess.Popen[bytes]) -> None:
        """Warm shutdown, then kill the process group it leads (its pool children) if needed."""
        # SIGTERM: warm shutdown (a solo worker on RabbitMQ may take ~10 s to notice it: its tasks
        # are done by then, so it is killed after a short wait).
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        with contextlib.suppress(ProcessLookupError):  # pool children still alive in the group
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the worker (and beat), delete the queue."""
        for proc in [*self.extra, *([self.proc] if self.proc else [])]:
            self.stop_process(proc)
        self.extra.clear()
        try:
            with brokers.connection(self.broker) as conn:
                conn.default_channel.queue_delete(self.queue)
        except Exception:  # leftover queue: harmless, uniquely named
            pass

    def log(self) -> str:
        """The worker's output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def app(self, **kwargs: Any) -> Celery:
        """A client app (threadline installed) publishing to this worker's queue."""
        from tests.celery_app.tasks import make_app

        return make_app(self.broker, BACKEND_URL, self.queue, **kwargs)

    @contextlib.contextmanager
    def serving(self) -> Iterator[Worker]:
        """Start the worker with a client app for its queue made current; stop it and uninstall
        the app afterwards (what a module-scoped worker fixture yields)."""
        self.start()
        app = self.app()
        app.set_current()
        try:
            yield self
        finally:
            self.stop()
            threadline.celery.uninstall(app)

    def publish_raw(
        self,
        name: str,
        args: list[Any],
        headers: dict[str, Any] | None = None,
        task_id: str | None = None,
        retries: int = 0,
    ) -> str:
        """Publish a task message straight to the broker with kombu: no Celery signals run.

        This is what a producer without threadline (or a forger) sends. Returns the task id.
        """
        builder = Celery(set_as_current=False)  # only its message format is used: never finalized
        task_id = task_id or str(uuid.uuid4())
        message = builder.amqp.as_task_v2(task_id, name, args, {}, root_id=task_id, retries=retries)
        message_headers = dict(message.headers)
        message_headers.update(headers or {})
        with brokers.connection(self.broker) as conn:  # the filesystem fallback takes it too
            Producer(conn).publish(
                message.body,
                exchange="",
                routing_key=self.queue,
                serializer="json",
                headers=message_headers,
                retry=True,
                **message.properties,
            )
        return task_id


def wait_rows(
    dsn: str,
    prefix: str,
    count: int,
    *,
    timeout: float = 30,
    worker: Worker | None = None,
    settle: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Poll until ``count`` event rows whose label starts with ``prefix`` exist; rows by label."""
    rows = wait_row_list(dsn, prefix, count, timeout=timeout, worker=worker, settle=settle)
    by_label = {row["label"]: row for row in rows}
    assert len(by_label) == len(rows), f"duplicate labels: {rows}"
    return by_label


def wait_row_list(
    dsn: str,
    prefix: str,
    count: int,
    *,
    timeout: float = 30,
    worker: Worker | None = None,
    settle: float = 0.0,
) -> list[dict[str, Any]]:
    """Poll until ``count`` event rows whose label starts with ``prefix`` exist; oldest first."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        while True:
            rows = cur.execute(ROWS_SQL, [prefix.replace("%", r"\%") + "%"]).fetchall()
            if len(rows) >= count:
                break
            if time.monotonic() > deadline:
                log = worker.log()[-6000:] if worker else ""
                raise AssertionError(f"expected {count} rows for {prefix!r}, got {len(rows)}: {rows}\n{log}")
            time.sleep(0.05)
        if settle:
            time.sleep(settle)
            rows = cur.execute(ROWS_SQL, [prefix.replace("%", r"\%") + "%"]).fetchall()
    return rows
