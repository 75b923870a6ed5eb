"""Shared pieces: the audited table, a worker running a given app module, story assertions."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from psycopg.rows import dict_row

import threadline
from tests.celery_app.harness import Worker

POSTS_DDL = """
CREATE SCHEMA IF NOT EXISTS web_t;
CREATE TABLE IF NOT EXISTS web_t.posts (id bigserial PRIMARY KEY, title text NOT NULL, note text);
"""

STORY_SQL = """
SELECT t.id, t.actor, t.correlation_id, t.request_id, t.causation_id, t.origin, t.job, t.meta,
       c.op, c.table_name, c.pk, c.after
  FROM threadline.transactions t JOIN threadline.changes c ON c.transaction_id = t.id
 WHERE t.correlation_id = %s
 ORDER BY t.id, c.id
"""


def setup_posts(dsn: str) -> None:
    """Create and track ``web_t.posts`` (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(POSTS_DDL)
        threadline.ddl.track(conn, "web_t.posts")


def start_worker(app_module: str, dsn: str, tmp: Path, *, concurrency: int = 4) -> Worker:
    """A real ``celery worker`` (thread pool, Redis or its fallback) running ``app_module``, started."""
    worker = Worker("redis", "threads", dsn, tmp, concurrency=concurrency)
    worker.args[worker.args.index("tests.celery_app.worker")] = app_module
    return worker.start()


def story(dsn: str, correlation_id: str, count: int, *, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll until ``count`` captured changes carry ``correlation_id``; rows oldest first."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row)
        while True:
            rows = cur.execute(STORY_SQL, [correlation_id]).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def assert_web_then_worker(rows: list[dict[str, Any]], actor: dict[str, str], correlation_id: str) -> None:
    """The request's insert and the worker's update: same actor and correlation id, causally linked."""
    assert len(rows) == 2, rows
    web, job = rows
    assert (web["op"], web["origin"], web["actor"]) == ("insert", "web", actor), web
    assert (job["op"], job["origin"], job["actor"]) == ("update", "celery", actor), job
    assert web["correlation_id"] == job["correlation_id"] == correlation_id
    assert web["request_id"] and web["request_id"] != correlation_id
    assert job["causation_id"] == web["request_id"], (web, job)
    assert job["job"]["name"].endswith("touch") and job["after"]["note"] == "from-worker"
    assert web["pk"] == job["pk"]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Serve ``app`` over real HTTP on 127.0.0.1 (one thread per request); yields the base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
