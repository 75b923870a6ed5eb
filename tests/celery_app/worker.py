"""The app a test worker runs: ``celery -A tests.celery_app.worker worker``, configured by env."""

from __future__ import annotations

import json
import logging
import os

from celery import signals

import threadline
from tests.celery_app import tasks  # noqa: F401 - registers the shared tasks
from tests.celery_app.tasks import make_app

_keys = os.environ.get("THREADLINE_TEST_CELERY_SIGNING_KEYS")

app = make_app(
    os.environ["THREADLINE_TEST_CELERY_BROKER"],
    os.environ["THREADLINE_TEST_CELERY_BACKEND"],
    os.environ["THREADLINE_TEST_CELERY_QUEUE"],
    signing_keys=_keys.split(",") if _keys else None,
    beat_label=os.environ.get("THREADLINE_TEST_CELERY_BEAT_LABEL"),
    beat_headers=json.loads(os.environ.get("THREADLINE_TEST_CELERY_BEAT_HEADERS") or "{}"),
    # every test worker records its task runs: each path runs with the recorder on
    record_task_runs=os.environ["THREADLINE_TEST_CELERY_DSN"],
)


@signals.task_postrun.connect(weak=False)
def _check_reset(task_id: str | None = None, **_: object) -> None:
    """Runs after threadline's own postrun receiver: the worker's context must be empty again."""
    if not threadline.current().is_empty:
        logging.getLogger("tests.celery_app").error("context left behind after task %s", task_id)
