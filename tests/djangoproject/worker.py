"""The Django project's Celery worker app: ``celery -A tests.djangoproject.worker worker``."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")
django.setup()

from tests.celery_app.tasks import make_app  # noqa: E402
from tests.djangoproject.blog import tasks  # noqa: E402, F401 - registers the tasks

app = make_app(
    os.environ["THREADLINE_TEST_CELERY_BROKER"],
    os.environ["THREADLINE_TEST_CELERY_BACKEND"],
    os.environ["THREADLINE_TEST_CELERY_QUEUE"],
)
