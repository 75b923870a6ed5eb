"""The worker app of the web tests: ``celery -A tests.webapps.worker worker`` (configured by env)."""

from __future__ import annotations

import os

from tests.celery_app.tasks import make_app
from tests.webapps import tasks  # noqa: F401 - registers the tasks

app = make_app(
    os.environ["THREADLINE_TEST_CELERY_BROKER"],
    os.environ["THREADLINE_TEST_CELERY_BACKEND"],
    os.environ["THREADLINE_TEST_CELERY_QUEUE"],
)
