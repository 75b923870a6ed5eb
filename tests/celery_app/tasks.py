"""Test tasks: each writes one row to the tracked table ``celery_t.events`` under the context it sees.

The tasks are shared (``@threadline.task`` without an app), so they register on every app:
the worker's (``tests.celery_app.worker``) and the ones the tests publish with.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import celery
from celery import Celery

import threadline
from tests.brokers import transport_options
from threadline import ActorRef, ThreadlineConnection

NAME = "tests.celery_app.tasks."
DSN_ENV = "THREADLINE_TEST_CELERY_DSN"
DEFAULT_ACTOR = ActorRef.system("celery")
BEAT_ACTOR = ActorRef.system("beat")

_local = threading.local()


def make_app(
    broker: str,
    backend: str,
    queue: str,
    *,
    signing_keys: list[str] | None = None,
    beat_label: str | None = None,
    beat_headers: dict[str, Any] | None = None,
    install: bool = True,
    record_task_runs: str | None = None,
) -> Celery:
    """A Celery app publishing to (and consuming from) ``queue``; threadline installed on it."""
    app = Celery("threadline_test", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=False,
        result_expires=600,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": 600, **transport_options(broker)},
    )
    if beat_label:
        app.conf.beat_schedule = {
            "tick": {
                "task": NAME + "beat_tick",
                "schedule": 0.5,
                "args": (beat_label,),
                "options": {"headers": beat_headers or {}},
            },
        }
    if install:
        threadline.celery.install(
            app, default_actor=DEFAULT_ACTOR, signing_keys=signing_keys, record_task_runs=record_task_runs
        )
    return app


def _conn() -> ThreadlineConnection[Any]:
    # One per thread and per process: a pool child forked after the worker's main process wrote
    # (an errback called there in place) must not share that process's connection.
    conn: ThreadlineConnection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed or getattr(_local, "pid", None) != os.getpid():
        conn = ThreadlineConnection.connect(os.environ[DSN_ENV], autocommit=True)
        _local.conn, _local.pid = conn, os.getpid()
    return conn


def write(label: str) -> dict[str, Any]:
    """Insert one event row (its transaction carries the current context); return that context."""
    _conn().execute(
        "INSERT INTO celery_t.events (id, label, pid, thread) VALUES (%s, %s, %s, %s)",
        [uuid.uuid4().hex, label, os.getpid(), str(threading.get_ident())],
    )
    return threadline.current().to_dict()


@threadline.task
def record(label: str) -> dict[str, Any]:
    """Write one row."""
    return write(label)


@celery.shared_task
def plain_record(label: str) -> dict[str, Any]:
    """A plain Celery task (not a threadline Task): the signals still carry its context."""
    return write(label)


class OwnBase(celery.Task):  # type: ignore[misc]
    """A task base class of the application's own (not threadline's, not the app's)."""


@celery.shared_task(base=OwnBase)
def own_base_record(label: str) -> dict[str, Any]:
    """A plain Celery task on a base of its own: the signals still carry its context."""
    return write(label)


@celery.shared_task(base=OwnBase, time_limit=1)
def own_base_overrun(label: str) -> None:
    """Like overrun, on a base of its own."""
    write(label)
    time.sleep(30)


@threadline.task
def record_many(results: list[Any], label: str) -> str:
    """Chord callback: write one row."""
    write(label)
    return label


@threadline.task(bind=True)
def spawn(self: celery.Task, label: str) -> str:
    """Write a row, then enqueue a child task."""
    write(label)
    record.delay(label + ":child")
    return label


@threadline.task(bind=True, max_retries=5)
def flaky(self: celery.Task, label: str, failures: int) -> str:
    """Write a row per attempt; retry until ``failures`` retries happened."""
    write(f"{label}:try{self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=0)
    return label


@threadline.task(bind=True, autoretry_for=(RuntimeError,), retry_kwargs={"countdown": 0, "max_retries": 5})
def auto_flaky(self: celery.Task, label: str, failures: int) -> str:
    """Like flaky, through autoretry_for."""
    write(f"{label}:try{self.request.retries}")
    if self.request.retries < failures:
        raise RuntimeError("fails on purpose, to be retried")
    return label


@threadline.task
def fail(label: str) -> None:
    """Write a row, then fail."""
    write(label)
    raise RuntimeError("fails on purpose")


@threadline.task(bind=True, max_retries=2)
def give_up(self: celery.Task, label: str) -> None:
    """Write nothing; retry twice, then fail (the retries are exhausted)."""
    raise self.retry(countdown=0, exc=LookupError(f"{label} is not there yet"))


@threadline.task(time_limit=1)
def overrun(label: str) -> None:
    """Write a row, then outlive the hard time limit: the worker's main process fails it."""
    write(label)
    time.sleep(30)


@threadline.task
def errback(*args: Any, label: str) -> None:
    """A link_error callback: published as a task with the failed task's id (Celery 5.5 and
    later), or called in the failed task's worker with its request, exception and traceback."""
    write(label)


@threadline.task(bind=True)
def replacer(self: celery.Task, label: str) -> Any:
    """Write a row, then replace itself with a record task."""
    write(label)
    return self.replace(record.si(label + ":replacement"))


@threadline.task(default_actor=BEAT_ACTOR)
def beat_tick(label: str) -> str:
    """A periodic root task: its per-task default actor applies when it arrives with no context."""
    write(label)
    record.delay(label + ":child")
    return label


@threadline.task(signature_policy="reject")
def guarded(label: str) -> str:
    """A task whose policy refuses an unsigned or forged context."""
    write(label)
    return label


@threadline.task
def show_context(label: str) -> dict[str, Any]:
    """Return the context the task sees, without touching the database."""
    return threadline.current().to_dict()
