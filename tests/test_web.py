"""WSGI and ASGI middleware: request contexts, untrusted ids, reset, and the web → worker story.

End to end: a plain WSGI app served over real HTTP on 127.0.0.1 and a plain ASGI app each write a
row and enqueue a task that a real Celery worker (Redis) runs to update it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

import threadline
from threadline import ActorRef, ConfigurationError, ThreadlineConnection
from threadline.propagation.web import ASGIMiddleware, WSGIMiddleware, bind_actor

from .celery_app.harness import Worker, env_var
from .webapps import tasks
from .webapps.support import assert_web_then_worker, serve_wsgi, setup_posts, start_worker, story

UUID_LEN = 36


@pytest.fixture(scope="module")
def web_dsn(database: str) -> Iterator[str]:
    setup_posts(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture(scope="module")
def worker(web_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker("tests.webapps.worker", web_dsn, Path(tmp_path_factory.mktemp("web-celery")))
    CELERY[0] = w.app()  # request threads do not see a thread-local current app: use this one
    try:
        yield w
    finally:
        w.stop()


CELERY: list[Any] = [None]


def enqueue_touch(post_id: int) -> None:
    CELERY[0].tasks[tasks.touch.name].delay(post_id, "from-worker")


@pytest.fixture(scope="module")
def pool(web_dsn: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(
        web_dsn, connection_class=ThreadlineConnection, kwargs={"autocommit": True}, min_size=2, max_size=16
    ) as p:
        yield p


def user_from_header(request: Any) -> ActorRef | None:
    user = request.get("HTTP_X_USER")
    return ActorRef.user(user) if user else None


def make_wsgi_app(pool: ConnectionPool[Any]) -> Any:
    """Insert a post (and enqueue ``touch`` for it when asked); reply with the context seen."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ctx = threadline.current()
        with pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO web_t.posts (title) VALUES (%s) RETURNING id", [environ.get("HTTP_X_TITLE", "t")]
            ).fetchone()
        assert row is not None
        if environ.get("HTTP_X_ENQUEUE"):
            enqueue_touch(row[0])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"id": row[0], "ctx": ctx.to_dict()}).encode()]

    return app


def call_wsgi(app: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
    """Call a WSGI app in-process; return (response headers, body)."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: dict[str, str] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen.update(response_headers)

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return seen, data


def context_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(threadline.current().to_dict()).encode()]


# -- end to end ---------------------------------------------------------------------------------


def test_wsgi_over_real_http_web_and_worker_share_actor_and_correlation(
    worker: Worker, web_dsn: str, pool: ConnectionPool[Any]
) -> None:
    app = WSGIMiddleware(make_wsgi_app(pool), actor_resolver=user_from_header)
    corr = f"wsgi-{uuid.uuid4().hex}"
    with serve_wsgi(app) as url:
        req = urllib.request.Request(
            url + "/post", headers={"X-Correlation-ID": corr, "X-User": "7", "X-Enqueue": "1"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["X-Correlation-ID"] == corr
            body = json.loads(resp.read())
    assert body["ctx"]["origin"] == "web" and body["ctx"]["meta"] == {"client": "127.0.0.1"}
    rows = story(web_dsn, corr, 2)
    assert_web_then_worker(rows, {"type": "user", "id": "7"}, corr)
    assert rows[0]["request_id"] == body["ctx"]["request_id"]
    assert threadline.current().is_empty


def test_asgi_web_and_worker_share_actor_and_correlation(worker: Worker, web_dsn: str) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with await psycopg.AsyncConnection.connect(web_dsn) as conn, threadline.transaction(conn):
            cur = await conn.execute("INSERT INTO web_t.posts (title) VALUES ('asgi') RETURNING id")
            row = await cur.fetchone()
        assert row is not None
        enqueue_touch(row[0])
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = ASGIMiddleware(
        app, actor_resolver=lambda scope: ActorRef.user(dict(scope["headers"])[b"x-user"].decode())
    )

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=wrapped)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post("/", headers={"X-Request-ID": "asgi-req-1", "X-User": "8"})

    corr = "asgi-req-1"
    with psycopg.connect(web_dsn, autocommit=True) as c:  # the id is fixed: forget earlier runs
        c.execute(
            "UPDATE threadline.transactions SET correlation_id = 'old' WHERE correlation_id = %s", [corr]
        )
    resp = asyncio.run(run())
    assert (
        resp.status_code == 201 and resp.headers["x-correlation-id"] == corr and resp.headers["x-app"] == "1"
    )
    assert_web_then_worker(story(web_dsn, corr, 2), {"type": "user", "id": "8"}, corr)


def test_concurrent_requests_over_real_http_never_bleed(
    worker: Worker, web_dsn: str, pool: ConnectionPool[Any]
) -> None:
    app = WSGIMiddleware(make_wsgi_app(pool), actor_resolver=user_from_header)
    run = uuid.uuid4().hex[:8]
    barrier = threading.Barrier(12)

    def one(i: int) -> tuple[int, str]:
        barrier.wait()
        req = urllib.request.Request(
            url + "/post",
            headers={
                "X-Correlation-ID": f"c-{run}-{i}",
                "X-User": f"u{i}",
                "X-Title": f"{run}-{i}",
                "X-Enqueue": "1",
            },
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            return i, resp.headers["X-Correlation-ID"]

    with serve_wsgi(app) as url, ThreadPoolExecutor(12) as ex:
        echoed = dict(ex.map(one, range(36)))
    assert echoed == {i: f"c-{run}-{i}" for i in range(36)}
    for i in range(36):
        rows = story(web_dsn, f"c-{run}-{i}", 2)
        assert_web_then_worker(rows, {"type": "user", "id": f"u{i}"}, f"c-{run}-{i}")
        assert rows[0]["after"]["title"] == f"{run}-{i}"


def test_concurrent_asgi_requests_never_bleed() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen = []
        for _ in range(5):  # interleave with the other requests
            seen.append(threadline.current().to_dict())
            await asyncio.sleep(0.001)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(seen).encode()})

    wrapped = ASGIMiddleware(
        app, actor_resolver=lambda s: ActorRef.user(dict(s["headers"])[b"x-user"].decode())
    )

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=wrapped), base_url="http://t"
        ) as client:  # type: ignore[arg-type]
            return await asyncio.gather(
                *(
                    client.get("/", headers={"X-User": str(i), "X-Correlation-ID": f"a-{i}"})
                    for i in range(40)
                )
            )

    for i, resp in enumerate(asyncio.run(run())):
        seen = resp.json()
        assert {(s["actor"]["id"], s["correlation_id"]) for s in seen} == {(str(i), f"a-{i}")}
        assert len({s["request_id"] for s in seen}) == 1


# -- ids ----------------------------------------------------------------------------------------


def test_generated_fallback_and_preferred_ids() -> None:
    app = WSGIMiddleware(context_app)
    headers, body = call_wsgi(app)
    ctx = json.loads(body)
    assert len(ctx["correlation_id"]) == UUID_LEN and headers["X-Correlation-ID"] == ctx["correlation_id"]
    assert len(ctx["request_id"]) == UUID_LEN and ctx["request_id"] != ctx["correlation_id"]
    assert ctx["origin"] == "web" and "actor" not in ctx
    _, body = call_wsgi(app, {"X-Request-ID": "from-request-id"})
    assert json.loads(body)["correlation_id"] == "from-request-id"
    _, body = call_wsgi(app, {"X-Request-ID": "b", "X-Correlation-ID": "a:1/2+3=@x_y.z-w"})
    assert json.loads(body)["correlation_id"] == "a:1/2+3=@x_y.z-w"
    _, body2 = call_wsgi(app)
    assert json.loads(body2)["request_id"] != ctx["request_id"]


BAD_IDS = {
    "over-long": "x" * 129,
    "crlf": "abc\r\nSet-Cookie: evil=1",
    "lf": "abc\ndef",
    "nul": "abc\x00def",
    "del": "abc\x7fdef",
    "space": "a b",
    "quote": 'a"b',
    "non-ascii": "caf\u00e9",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_bad_incoming_ids_are_replaced_and_logged_escaped(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = BAD_IDS[name]
    caplog.set_level(logging.WARNING, logger="threadline.web")
    headers, body = call_wsgi(WSGIMiddleware(context_app), {"X-Correlation-ID": bad})
    corr = json.loads(body)["correlation_id"]
    assert corr != bad and len(corr) == UUID_LEN and headers["X-Correlation-ID"] == corr
    # a bad first header does not hide a good second one
    _, body = call_wsgi(WSGIMiddleware(context_app), {"X-Correlation-ID": bad, "X-Request-ID": "good-1"})
    assert json.loads(body)["correlation_id"] == "good-1"

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": threadline.current().correlation_id.encode()})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "headers": [(b"x-correlation-id", bad.encode("utf-8"))],
        "client": ("10.0.0.1", 5),
    }
    asyncio.run(ASGIMiddleware(asgi_app)(scope, None, send))  # type: ignore[arg-type]
    assert len(sent[1]["body"]) == UUID_LEN and (b"x-correlation-id", sent[1]["body"]) in sent[0]["headers"]

    refusals = [r for r in caplog.records if "ignored the incoming X-Correlation-ID" in r.getMessage()]
    assert len(refusals) == 3
    for record in refusals:
        text = record.getMessage()
        assert "\r" not in text and "\n" not in text and "\x00" not in text and "\x7f" not in text
        assert "x" * 65 not in text  # truncated


def test_header_configuration() -> None:
    app = WSGIMiddleware(context_app, correlation_headers=["X-Trace"], response_header=None)
    headers, body = call_wsgi(app, {"X-Trace": "t-1", "X-Correlation-ID": "ignored"})
    assert json.loads(body)["correlation_id"] == "t-1" and "X-Correlation-ID" not in headers
    headers, body = call_wsgi(
        WSGIMiddleware(context_app, response_header="X-Corr", max_id_length=10), {"X-Request-ID": "a" * 11}
    )
    assert headers["X-Corr"] == json.loads(body)["correlation_id"] != "a" * 11
    for bad in (
        {"correlation_headers": ["Bad Header"]},
        {"response_header": "X\r\nY"},
        {"max_id_length": 1000},
    ):
        with pytest.raises(ConfigurationError):
            WSGIMiddleware(context_app, **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ASGIMiddleware(object())  # type: ignore[arg-type]


def test_actor_resolver_failures_do_not_break_the_request(caplog: pytest.LogCaptureFixture) -> None:
    def boom(environ: Any) -> ActorRef:
        raise RuntimeError("auth backend down")

    _, body = call_wsgi(WSGIMiddleware(context_app, actor_resolver=boom))
    assert "actor" not in json.loads(body) and "actor resolver failed" in caplog.text
    _, body = call_wsgi(WSGIMiddleware(context_app, actor_resolver=lambda e: "not an actor"))
    assert "actor" not in json.loads(body) and "invalid actor" in caplog.text
    _, body = call_wsgi(WSGIMiddleware(context_app, actor_resolver=lambda e: "service_account:ci"))
    assert json.loads(body)["actor"] == {"type": "service_account", "id": "ci"}


# -- reset --------------------------------------------------------------------------------------


def test_wsgi_context_is_reset_after_plain_streaming_and_failing_responses() -> None:
    outer = threadline.AuditContext(correlation_id="outer")
    seen: list[str | None] = []

    def streaming(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        for i in range(3):
            seen.append(threadline.current().origin)
            yield str(i).encode()

    def failing(environ: Any, start_response: Any) -> list[bytes]:
        raise RuntimeError("boom")

    with threadline.use_context(outer):
        assert call_wsgi(WSGIMiddleware(streaming))[1] == b"012"
        assert seen == ["web"] * 3 and threadline.current() is outer
        call_wsgi(WSGIMiddleware(context_app))
        assert threadline.current() is outer
        with pytest.raises(RuntimeError):
            call_wsgi(WSGIMiddleware(failing))
        assert threadline.current() is outer
        # a body that is closed before it is exhausted
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        body = WSGIMiddleware(streaming)(environ, lambda *a: None)
        next(iter(body))
        assert threadline.current().origin == "web"
        body.close()  # type: ignore[attr-defined]
        assert threadline.current() is outer


class _CallbackOnClose:
    """A body whose ``close()`` runs the app's close-time callbacks (as Flask's response does)."""

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def __iter__(self) -> Iterator[bytes]:
        yield b"done"

    def close(self) -> None:
        self.seen.append(threadline.current().correlation_id)


def test_wsgi_body_close_runs_under_the_request_context() -> None:
    seen: list[Any] = []

    def app(environ: Any, start_response: Any) -> _CallbackOnClose:
        start_response("200 OK", [])
        return _CallbackOnClose(seen)

    _, body = call_wsgi(WSGIMiddleware(app), {"X-Request-ID": "req-close"})
    assert body == b"done" and seen == ["req-close"]  # exhausted first, then closed
    assert threadline.current().is_empty


def test_bind_actor_lasts_until_the_end_of_the_request() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        bind_actor(ActorRef.user("late"))
        return context_app(environ, start_response)

    _, body = call_wsgi(WSGIMiddleware(app))
    assert json.loads(body)["actor"] == {"type": "user", "id": "late"}
    assert threadline.current().is_empty


def test_asgi_streaming_lifespan_and_websocket() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], threadline.current()))
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            seen.append(("chunk", threadline.current().correlation_id))
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def run() -> None:
        mw = ASGIMiddleware(app)
        lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}}
        await mw(lifespan, None, send)  # type: ignore[arg-type]
        assert seen[-1] == ("lifespan", threadline.current()) and sent == []
        await mw({"type": "websocket", "headers": [(b"x-correlation-id", b"ws-1")]}, None, send)  # type: ignore[arg-type]
        assert seen[-1][1].correlation_id == "ws-1" and seen[-1][1].origin == "web"
        assert sent[-1] == {"type": "websocket.accept", "headers": [(b"x-correlation-id", b"ws-1")]}
        await mw({"type": "http", "headers": [(b"x-correlation-id", b"h-1")]}, None, send)  # type: ignore[arg-type]
        assert [c for k, c in seen if k == "chunk"] == ["h-1"] * 3
        assert threadline.current().is_empty

        async def failing(scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await ASGIMiddleware(failing)({"type": "http", "headers": []}, None, send)  # type: ignore[arg-type]
        assert threadline.current().is_empty

    asyncio.run(run())


def test_threadline_imports_without_django_or_sqlalchemy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules.update(django=None, sqlalchemy=None, flask=None, starlette=None); "
        "import threadline, threadline.propagation.web; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
