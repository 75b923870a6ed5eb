"""Tasks for the fault tests (``tests/test_faults.py``): loaded into a worker with ``-I``."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import celery
import psycopg

import threadline
from tests.celery_app.tasks import _conn


def _insert(label: str) -> None:
    _conn().execute(
        "INSERT INTO celery_t.events (id, label, pid, thread) VALUES (%s, %s, %s, %s)",
        [uuid.uuid4().hex, label, os.getpid(), str(threading.get_ident())],
    )


@threadline.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def hold_then_write(self: celery.Task, label: str, marker: str) -> str:
    """First delivery: write inside an open transaction, announce it with ``marker`` and wait to be
    killed. A later delivery (the marker exists) writes and commits."""
    first = not Path(marker).exists()
    with _conn().transaction():
        _insert(label)
        if first:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(120)
    return label


@threadline.task(
    bind=True,
    acks_late=True,
    autoretry_for=(psycopg.OperationalError,),
    retry_kwargs={"countdown": 0.2, "max_retries": 20},
)
def slow_write(self: celery.Task, label: str, hold: float) -> str:
    """Write one row in a transaction held open ``hold`` seconds; retried when the database
    connection is lost."""
    with _conn().transaction():
        _insert(label)
        time.sleep(hold)
    return label
