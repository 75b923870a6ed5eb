"""Django: the middleware and the ORM bridge, with a project (tests/djangoproject) and a real worker.

A request through ``ThreadlineMiddleware`` writes a row with the ORM and enqueues a task that
updates it through the ORM in a real Celery worker process: both transactions share the actor and
correlation id, and the worker's causation id is the request id. Every kind of ORM write carries
the context in autocommit mode and in ``atomic()`` blocks.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import threadline
from threadline import ActorRef, ConfigurationError, ThreadlineConnection

from .celery_app.harness import Worker
from .webapps.support import assert_web_then_worker, start_worker, story

DSN_ENV = "THREADLINE_TEST_CELERY_DSN"

CHANGES_SQL = """
SELECT t.id AS tx, t.actor, t.correlation_id, t.origin, c.op, c.after, c.before
  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
 WHERE c.table_name = 'dj_posts' AND t.id > %s
 ORDER BY c.id
"""


@pytest.fixture(scope="module")
def django_dsn(database: str) -> Iterator[str]:
    old = os.environ.get(DSN_ENV)
    os.environ[DSN_ENV] = database
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")
    import django

    django.setup()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.dj_posts (id bigserial PRIMARY KEY, title varchar(200) NOT NULL, note text)"
        )
        threadline.ddl.track(conn, "public.dj_posts")
    yield database
    from django.db import connections

    connections.close_all()
    if old is None:
        os.environ.pop(DSN_ENV, None)
    else:
        os.environ[DSN_ENV] = old


@pytest.fixture(scope="module")
def django_worker(django_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    from tests.djangoproject.blog import views

    worker = start_worker(
        "tests.djangoproject.worker", django_dsn, Path(tmp_path_factory.mktemp("dj-celery"))
    )
    views.CELERY[0] = worker.app()
    try:
        yield worker
    finally:
        worker.stop()


def last_tx(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM threadline.transactions").fetchone()
        assert row is not None
        return int(row[0])


def dj_changes(dsn: str, after: int) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        return conn.cursor(row_factory=dict_row).execute(CHANGES_SQL, [after]).fetchall()


def test_request_orm_write_and_orm_task_tell_one_story(django_worker: Worker, django_dsn: str) -> None:
    from django.test import Client

    corr = f"dj-{uuid.uuid4().hex}"
    resp = Client().post("/posts/", headers={"X-Correlation-ID": corr, "X-User": "42", "X-Enqueue": "1"})
    assert resp.status_code == 200 and resp.headers["X-Correlation-ID"] == corr
    body = resp.json()
    assert body["ctx"]["actor"] == {"type": "user", "id": "42"} and body["ctx"]["origin"] == "web"
    rows = story(django_dsn, corr, 2)
    assert_web_then_worker(rows, {"type": "user", "id": "42"}, corr)
    assert rows[0]["request_id"] == body["ctx"]["request_id"]
    assert threadline.current().is_empty


def test_atomic_view_raw_sql_savepoint_and_on_commit_task(django_worker: Worker, django_dsn: str) -> None:
    from django.test import Client

    before = last_tx(django_dsn)
    resp = Client().post("/atomic/", headers={"X-Request-ID": "dj-atomic-" + uuid.uuid4().hex, "X-User": "5"})
    corr = resp.headers["X-Correlation-ID"]
    assert corr.startswith("dj-atomic-")
    rows = story(django_dsn, corr, 4)
    web, job = rows[:3], rows[3]
    assert len({r["id"] for r in web}) == 1  # one transaction: insert, raw update, nested update
    assert [r["op"] for r in web] == ["insert", "update", "update"]
    assert all(r["actor"] == {"type": "user", "id": "5"} and r["origin"] == "web" for r in web)
    assert job["origin"] == "celery" and job["actor"] == {"type": "user", "id": "5"}
    assert job["causation_id"] == web[0]["request_id"]
    assert last_tx(django_dsn) >= before + 2


def test_anonymous_user_and_no_user(django_dsn: str) -> None:
    from django.test import Client, override_settings

    resp = Client().post("/posts/")
    assert resp.json()["ctx"]["actor"] == {"type": "anonymous"}
    with override_settings(MIDDLEWARE=["threadline.propagation.django.ThreadlineMiddleware"]):
        resp = Client().post("/posts/")  # no AuthenticationMiddleware: no request.user
    assert "actor" not in resp.json()["ctx"]
    with override_settings(THREADLINE={"ACTOR_RESOLVER": lambda request: ActorRef.service_account("api")}):
        resp = Client().post("/posts/")
    assert resp.json()["ctx"]["actor"] == {"type": "service_account", "id": "api"}


@pytest.mark.parametrize("alias", ["default", "serverside"])
def test_every_kind_of_orm_write_carries_the_context(django_dsn: str, alias: str) -> None:
    from django.db import connections, transaction

    from tests.djangoproject.blog.models import Post

    connection = connections[alias]
    posts = Post.objects.using(alias)
    before = last_tx(django_dsn)
    with threadline.context(actor=ActorRef.user("1"), correlation_id="orm-auto"):
        post = posts.create(title="a")  # autocommit
        posts.bulk_create([Post(title="b1"), Post(title="b2")])
        posts.filter(pk=post.pk).update(note="u")
        post.title = "saved"
        post.save(using=alias)
        with connection.cursor() as cur:
            cur.execute("INSERT INTO dj_posts (title) VALUES (%s)", ["raw"])
            cur.execute("SELECT title FROM dj_posts WHERE title = %s", ["raw"])
            assert cur.fetchall() == [("raw",)]
        posts.filter(title__in=["b1", "b2"]).delete()
    with (
        threadline.context(actor=ActorRef.user("2"), correlation_id="orm-atomic"),
        transaction.atomic(using=alias),
    ):
        posts.create(title="c")
        posts.filter(title="raw").update(note="in-atomic")
    posts.filter(title="raw").delete()  # no context: recorded without an actor
    rows = dj_changes(django_dsn, before)
    by_corr: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        assert row["origin"] is None  # as given: no origin in these contexts
        by_corr.setdefault(row["correlation_id"], []).append(row)
    assert set(by_corr) == {"orm-auto", "orm-atomic", None}, rows
    auto, atomic = by_corr["orm-auto"], by_corr["orm-atomic"]
    assert [r["op"] for r in auto] == [
        "insert",
        "insert",
        "insert",
        "update",
        "update",
        "insert",
        "delete",
        "delete",
    ]
    assert all(r["actor"] == {"type": "user", "id": "1"} for r in auto)
    assert len({r["tx"] for r in auto}) == 6  # each autocommit write (bulk_create, delete: one each)
    assert [r["op"] for r in atomic] == ["insert", "update"] and len({r["tx"] for r in atomic}) == 1
    assert all(r["actor"] == {"type": "user", "id": "2"} for r in atomic)
    assert [(r["op"], r["actor"]) for r in by_corr[None]] == [("delete", None)]
    assert isinstance(connection.connection, ThreadlineConnection)
    binds_client_side = alias == "default"
    assert isinstance(connection.connection.cursor(), psycopg.ClientCursor) is binds_client_side


def test_context_changes_inside_atomic_and_savepoint_rollback(django_dsn: str) -> None:
    from django.db import IntegrityError, connection, transaction

    from tests.djangoproject.blog.models import Post

    before = last_tx(django_dsn)
    with transaction.atomic():  # begun without a context: the first write's context is set then
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        with threadline.context(actor=ActorRef.user("late"), correlation_id="orm-late"):
            with pytest.raises(IntegrityError), transaction.atomic():  # rolled-back savepoint
                Post.objects.create(title="x")
                with connection.cursor() as cur:
                    cur.execute("INSERT INTO dj_posts (id, title) VALUES (-1, 'dup'), (-1, 'dup')")
            Post.objects.create(title="after-rollback")
    rows = dj_changes(django_dsn, before)
    assert [(r["op"], r["after"]["title"], r["correlation_id"]) for r in rows] == [
        ("insert", "after-rollback", "orm-late")
    ]
    assert rows[0]["actor"] == {"type": "user", "id": "late"}


def test_no_context_sends_nothing_and_records_no_actor(django_dsn: str) -> None:
    from tests.djangoproject.blog.models import Post

    before = last_tx(django_dsn)
    Post.objects.create(title="anon")
    (row,) = dj_changes(django_dsn, before)
    assert row["actor"] is None and row["correlation_id"] is None


def test_concurrent_requests_never_bleed(django_dsn: str) -> None:
    from django.db import connections
    from django.test import Client

    run = uuid.uuid4().hex[:8]
    barrier = threading.Barrier(8)

    def one(i: int) -> str:
        if i < 8:
            barrier.wait()
        try:
            resp = Client().post(
                "/posts/",
                headers={
                    "X-Correlation-ID": f"dj-{run}-{i}",
                    "X-User": str(100 + i),
                    "X-Title": f"{run}-{i}",
                },
            )
            return str(resp.headers["X-Correlation-ID"])
        finally:
            connections.close_all()

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(32))) == [f"dj-{run}-{i}" for i in range(32)]
    with psycopg.connect(django_dsn) as conn:
        rows = conn.execute(
            """SELECT c.after->>'title', t.actor->>'id', t.correlation_id FROM threadline.changes c
                 JOIN threadline.transactions t ON t.id = c.transaction_id WHERE c.after->>'title' LIKE %s""",
            [f"{run}-%"],
        ).fetchall()
    assert sorted(rows) == sorted((f"{run}-{i}", str(100 + i), f"dj-{run}-{i}") for i in range(32))


def test_streaming_response_keeps_the_context_until_closed(django_dsn: str) -> None:
    from django.test import Client

    resp = Client().get("/stream/", headers={"X-Correlation-ID": "dj-stream"})
    assert b"".join(resp.streaming_content) == b"dj-stream\n" * 3  # type: ignore[attr-defined]
    resp.close()
    assert threadline.current().is_empty


def test_settings_are_validated(django_dsn: str) -> None:
    from django.test import override_settings

    from threadline.propagation.django import ThreadlineMiddleware

    for bad in (
        {"NOPE": 1},
        {"CORRELATION_HEADERS": "X-One"},
        {"RESPONSE_HEADER": "Bad Header"},
        {"ACTOR_RESOLVER": "no.such.resolver"},
        {"ACTOR_RESOLVER": 42},
        {"MAX_ID_LENGTH": 5000},
        {"ORM_BRIDGE": "false"},
        {"CORRELATION_FROM_TRACEPARENT": "no"},
        {"CLIENT_ADDRESS": None},
    ):
        with override_settings(THREADLINE=bad), pytest.raises(ConfigurationError):
            ThreadlineMiddleware(lambda request: None)


def test_async_requests_load_the_user_without_sync_database_access(django_dsn: str) -> None:
    """In async code Django refuses the lazy ``request.user`` query: the middleware awaits
    ``request.auser()`` instead, so a logged-in user is still the actor."""
    import asyncio

    from asgiref.sync import iscoroutinefunction
    from django.core.exceptions import SynchronousOnlyOperation
    from django.http import HttpResponse
    from django.test import RequestFactory

    from threadline.propagation.django import ThreadlineMiddleware

    seen: list[threadline.AuditContext] = []

    async def view(request: Any) -> HttpResponse:
        seen.append(threadline.current())
        return HttpResponse("ok")

    class User:
        pk = 42
        is_authenticated = True

    request = RequestFactory().get("/")

    async def auser() -> User:
        return User()

    def refuse(self: Any) -> None:
        raise SynchronousOnlyOperation("You cannot call this from an async context")

    request.auser = auser
    type(request).user = property(refuse)  # type: ignore[attr-defined]
    try:
        middleware = ThreadlineMiddleware(view)
        assert iscoroutinefunction(middleware)
        response = asyncio.run(middleware(request))
    finally:
        del type(request).user  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert seen[0].actor == ActorRef.user("42") and seen[0].origin == "web"


@pytest.mark.parametrize("failure", ["database", "actor"])
def test_async_requests_survive_a_failing_user_lookup(
    django_dsn: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As in sync code, a user that cannot be loaded (or is no valid actor) never fails the
    request: it runs without an actor, and the failure is logged."""
    import asyncio

    from django.http import HttpResponse
    from django.test import RequestFactory

    from threadline.propagation.django import ThreadlineMiddleware

    seen: list[threadline.AuditContext] = []

    async def view(request: Any) -> HttpResponse:
        seen.append(threadline.current())
        return HttpResponse("ok")

    class User:
        pk = "x" * 300  # longer than an actor id may be
        is_authenticated = True

    async def auser() -> User:
        if failure == "database":
            raise psycopg.OperationalError("the session store is down")
        return User()

    request = RequestFactory().get("/")
    request.auser = auser
    response = asyncio.run(ThreadlineMiddleware(view)(request))
    assert response.status_code == 200
    assert seen[0].actor is None and seen[0].origin == "web"
    assert "actor resolver failed" in caplog.text


@pytest.mark.parametrize("alias", ["default", "serverside"])
def test_query_api_on_django_connections_returns_what_a_psycopg_connection_returns(
    django_dsn: str, alias: str
) -> None:
    from django.db import connections, transaction

    from tests.djangoproject.blog.models import Post

    corr = f"dj-q-{uuid.uuid4().hex[:8]}"
    with threadline.context(actor=ActorRef.user("5"), correlation_id=corr, origin="web"):
        post = Post.objects.using(alias).create(title="first", note="n")
        with transaction.atomic(using=alias):
            Post.objects.using(alias).filter(pk=post.pk).update(title="second")
            threadline.record_action(connections[alias], "post.retitle", reason="typo")
    django_conn = connections[alias]
    calls: dict[str, Any] = {
        "timeline": lambda c: list(threadline.timeline(c, correlation_id=corr)),
        "history": lambda c: threadline.history(c, "public.dj_posts", post.pk),
        "actor_history": lambda c: [x.id for x in threadline.actor_history(c, "user:5")],
        "as_of": lambda c: threadline.as_of(c, "public.dj_posts", post.pk, datetime.now(timezone.utc)),
        "trace": lambda c: threadline.trace(c, corr).to_dict(),
        "actions": lambda c: [a.to_dict() for a in threadline.list_actions(c, correlation_id=corr)],
        "export": lambda c: _export_text(c, corr),
    }
    with psycopg.connect(django_dsn, autocommit=True) as plain:
        expected = {name: call(plain) for name, call in calls.items()}
    assert expected["history"][0].after == {"id": post.pk, "title": "second", "note": "n"}
    assert expected["as_of"]["title"] == "second" and len(expected["actions"]) == 1
    for inside_atomic in (False, True):
        if inside_atomic:
            with transaction.atomic(using=alias):
                got = {name: call(django_conn) for name, call in calls.items()}
        else:
            got = {name: call(django_conn) for name, call in calls.items()}
        for name in calls:
            assert got[name] == expected[name], (name, inside_atomic)
    # Django's own JSON handling is untouched: its text loader still serves the ORM
    with django_conn.cursor() as cur:
        cur.execute("SELECT '{\"a\": 1}'::jsonb")
        assert cur.fetchone() == ('{"a": 1}',)


def _export_text(conn: Any, corr: str) -> str:
    import io

    out = io.StringIO()
    threadline.export(conn, out, "ndjson", correlation_id=corr)
    return out.getvalue()


def test_query_api_refuses_other_databases_with_a_clear_error() -> None:
    class SQLite:
        vendor, alias, connection = "sqlite", "legacy", None

        def ensure_connection(self) -> None:
            return None

    with pytest.raises(ConfigurationError, match="'legacy' is sqlite: threadline needs PostgreSQL"):
        threadline.timeline(SQLite(), correlation_id="x")
    with pytest.raises(TypeError, match="expected a psycopg connection or a Django connection"):
        threadline.timeline(object(), correlation_id="x")  # type: ignore[arg-type]


def test_a_management_command_and_the_task_it_enqueues_are_one_story(
    django_worker: Worker, django_dsn: str
) -> None:
    import json
    import subprocess
    import sys

    env = {**django_worker.env, "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings"}
    res = subprocess.run(
        [sys.executable, "-m", "django", "touch_post"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    ctx = out["ctx"]
    assert ctx["origin"] == "cli" and ctx["meta"] == {"command": "touch_post"}
    assert ctx["correlation_id"].startswith("cli-") and "actor" not in ctx
    rows = story(django_dsn, ctx["correlation_id"], 2)
    assert [(r["op"], r["origin"]) for r in rows] == [("insert", "cli"), ("update", "celery")]
    # with an actor for commands, and off
    env["THREADLINE_TEST_COMMAND_SETTINGS"] = json.dumps({"COMMAND_ACTOR": "system:ops"})
    res = subprocess.run(
        [sys.executable, "-m", "django", "touch_post"], capture_output=True, text=True, env=env, timeout=60
    )
    assert json.loads(res.stdout)["ctx"]["actor"] == {"type": "system", "id": "ops"}, res.stderr
    env["THREADLINE_TEST_COMMAND_SETTINGS"] = json.dumps({"COMMAND_CONTEXT": False})
    res = subprocess.run(
        [sys.executable, "-m", "django", "touch_post"], capture_output=True, text=True, env=env, timeout=60
    )
    assert json.loads(res.stdout)["ctx"] == {"v": 1}, res.stderr  # empty


def test_the_orm_bridge_install_uninstall_installed(django_dsn: str) -> None:
    from django.db import connections

    from threadline.propagation import django as tl_django

    conn = connections["serverside"]
    assert tl_django.installed()
    try:
        tl_django.uninstall()
        assert not tl_django.installed()
        conn.close()
        conn.ensure_connection()
        assert not isinstance(conn.connection, ThreadlineConnection)  # opened while uninstalled
    finally:
        tl_django.install()
    assert tl_django.installed()
    assert isinstance(conn.connection, ThreadlineConnection)  # install() bridges open connections
    conn.close()
