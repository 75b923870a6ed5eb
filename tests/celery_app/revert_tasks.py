"""Tasks for the revert tests (``tests/test_revert.py``): loaded into a worker with ``-I``.

``write`` runs the statements it is given in one transaction (so one audit transaction per task,
carrying the context the worker restored) and returns its task id.
"""

from __future__ import annotations

import os
from typing import Any

import celery

import threadline
from tests.celery_app.tasks import DSN_ENV
from threadline import ThreadlineConnection


@threadline.task(bind=True)
def write(self: celery.Task, statements: list[list[Any]]) -> str:
    """Run each ``[sql, params]`` in one transaction; return this task's id."""
    with ThreadlineConnection.connect(os.environ[DSN_ENV], autocommit=True) as conn, conn.transaction():
        for statement, params in statements:
            conn.execute(statement, params)
    return str(self.request.id)
