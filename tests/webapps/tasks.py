"""Celery tasks of the web tests: each updates the row a web request wrote, under its context."""

from __future__ import annotations

import os
import threading
from typing import Any

import threadline
from threadline import ThreadlineConnection

DSN_ENV = "THREADLINE_TEST_CELERY_DSN"
_local = threading.local()


def _conn() -> ThreadlineConnection[Any]:
    conn: ThreadlineConnection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = ThreadlineConnection.connect(os.environ[DSN_ENV], autocommit=True)
        _local.conn = conn
    return conn


@threadline.task
def touch(post_id: int, note: str) -> dict[str, Any]:
    """Set ``web_t.posts.note`` of one row (an audited update); return the context the task saw."""
    _conn().execute("UPDATE web_t.posts SET note = %s WHERE id = %s", [note, post_id])
    return threadline.current().to_dict()
