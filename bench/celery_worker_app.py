"""The app a benchmark worker runs: ``celery -A bench.celery_worker_app worker`` from the repo root.

``THREADLINE_BENCH_INSTALL=1`` installs threadline and declares the task with
``@threadline.task``; ``0`` declares the same task with plain ``@app.task``. The task body only
counts itself in Redis, so the figures show the cost of propagation, not of work.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

import threadline
from threadline import ActorRef

INSTALLED = os.environ.get("THREADLINE_BENCH_INSTALL") == "1"
COUNTER = redis.Redis.from_url(os.environ["THREADLINE_BENCH_REDIS"])

app = Celery("threadline_bench", broker=os.environ["THREADLINE_BENCH_BROKER"], set_as_current=False)
app.conf.update(
    task_default_queue=os.environ["THREADLINE_BENCH_QUEUE"],
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    task_ignore_result=True,
)


def count(key: str) -> None:
    """The task body: one Redis INCR."""
    COUNTER.incr(key)


if INSTALLED:
    threadline.celery.install(app, default_actor=ActorRef.system("celery"))
    noop = threadline.task(app=app, name="bench.noop")(count)
else:
    noop = app.task(name="bench.noop")(count)
