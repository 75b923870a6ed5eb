"""The documented Flask and FastAPI recipes, each with SQLAlchemy and a real Celery worker.

Flask: ``WSGIMiddleware`` around ``app.wsgi_app``, the actor bound in ``before_request``, a sync
SQLAlchemy engine. FastAPI: ``app.add_middleware(ASGIMiddleware, ...)``, the actor bound by an
``async`` dependency, an async SQLAlchemy engine (and a sync endpoint run in the thread pool).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from flask import Flask, g, jsonify, request
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import threadline
from threadline import ActorRef
from threadline.propagation import sqlalchemy as tl_sqlalchemy
from threadline.propagation.web import ASGIMiddleware, WSGIMiddleware, bind_actor

from .celery_app.harness import Worker, env_var
from .test_sqlalchemy import sa_url
from .webapps import tasks
from .webapps.support import assert_web_then_worker, serve_wsgi, setup_posts, start_worker, story

INSERT = text("INSERT INTO web_t.posts (title) VALUES (:title) RETURNING id")


@pytest.fixture(scope="module")
def fw_dsn(database: str) -> Iterator[str]:
    setup_posts(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture(scope="module")
def celery_app(fw_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    worker: Worker = start_worker("tests.webapps.worker", fw_dsn, Path(tmp_path_factory.mktemp("fw-celery")))
    try:
        yield worker.app()
    finally:
        worker.stop()


def _flask_app(dsn: str) -> tuple[Any, Flask]:
    """A SQLAlchemy engine with the bridge installed, and a Flask app behind the WSGI middleware."""
    engine = create_engine(sa_url(dsn))
    tl_sqlalchemy.install(engine)
    app = Flask(__name__)
    app.wsgi_app = WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return engine, app


def test_flask_recipe(celery_app: Any, fw_dsn: str) -> None:
    engine, app = _flask_app(fw_dsn)

    @app.before_request
    def authenticate() -> None:
        user = request.headers.get("X-User")  # stands in for flask-login's current_user
        if user:
            g.user = user
            bind_actor(ActorRef.user(user))

    @app.post("/posts")
    def create() -> Any:
        with engine.begin() as conn:
            post_id = conn.execute(INSERT, {"title": "flask"}).scalar_one()
        celery_app.tasks[tasks.touch.name].delay(post_id, "from-worker")
        return jsonify(id=post_id, ctx=threadline.current().to_dict())

    corr = f"flask-{uuid.uuid4().hex}"
    resp = app.test_client().post("/posts", headers={"X-Correlation-ID": corr, "X-User": "11"})
    assert resp.status_code == 200 and resp.headers["X-Correlation-ID"] == corr
    assert resp.json is not None and resp.json["ctx"]["actor"] == {"type": "user", "id": "11"}
    assert_web_then_worker(story(fw_dsn, corr, 2), {"type": "user", "id": "11"}, corr)
    assert threadline.current().is_empty
    engine.dispose()


def test_flask_close_callbacks_keep_the_bound_actor(fw_dsn: str) -> None:
    # served over real HTTP: the server exhausts the body, then closes it, which runs Flask's
    # call_on_close callbacks; a write there is the request's, by the actor bound in before_request
    engine, app = _flask_app(fw_dsn)

    @app.before_request
    def authenticate() -> None:
        bind_actor(ActorRef.user(request.headers["X-User"]))

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(INSERT, {"title": "on-close"})

    @app.get("/download")
    def download() -> Any:
        response = app.response_class(iter([b"chunk"]) if request.args.get("stream") else b"done")
        response.call_on_close(write)
        return response

    corrs = [f"flask-close-{uuid.uuid4().hex}" for _ in range(2)]
    with serve_wsgi(app) as url:
        for corr, query in zip(corrs, ["", "?stream=1"], strict=True):
            with httpx.Client() as client:
                resp = client.get(
                    url + "/download" + query, headers={"X-Correlation-ID": corr, "X-User": "31"}
                )
                assert resp.status_code == 200
    for corr in corrs:
        (row,) = story(fw_dsn, corr, 1)
        assert row["actor"] == {"type": "user", "id": "31"}, row
    engine.dispose()


def test_fastapi_recipe(celery_app: Any, fw_dsn: str) -> None:
    async def run() -> list[httpx.Response]:
        engine = create_async_engine(sa_url(fw_dsn))
        tl_sqlalchemy.install(engine)
        sync_engine = create_engine(sa_url(fw_dsn))
        tl_sqlalchemy.install(sync_engine)

        async def current_user(x_user: str = Header()) -> str:
            bind_actor(ActorRef.user(x_user))  # async dependency: runs in the request's task
            return x_user

        app = FastAPI()
        app.add_middleware(ASGIMiddleware)

        @app.post("/posts")
        async def create(user: str = Depends(current_user)) -> dict[str, Any]:
            async with engine.begin() as conn:
                post_id = (await conn.execute(INSERT, {"title": "fastapi"})).scalar_one()
            celery_app.tasks[tasks.touch.name].delay(post_id, "from-worker")
            return {"id": post_id, "ctx": threadline.current().to_dict()}

        @app.post("/sync-posts")
        def create_sync(user: str = Depends(current_user)) -> dict[str, Any]:  # runs in a worker thread
            with sync_engine.begin() as conn:
                post_id = conn.execute(INSERT, {"title": "fastapi-sync"}).scalar_one()
            celery_app.tasks[tasks.touch.name].delay(post_id, "from-worker")
            return {"id": post_id}

        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return list(
                    await asyncio.gather(
                        client.post("/posts", headers={"X-Correlation-ID": corr, "X-User": "21"}),
                        client.post("/sync-posts", headers={"X-Correlation-ID": corr_sync, "X-User": "22"}),
                    )
                )
        finally:
            await engine.dispose()
            sync_engine.dispose()

    corr, corr_sync = f"fastapi-{uuid.uuid4().hex}", f"fastapi-sync-{uuid.uuid4().hex}"
    resp, resp_sync = asyncio.run(run())
    assert resp.status_code == 200 and resp.headers["x-correlation-id"] == corr
    assert resp_sync.status_code == 200 and resp_sync.headers["x-correlation-id"] == corr_sync
    assert_web_then_worker(story(fw_dsn, corr, 2), {"type": "user", "id": "21"}, corr)
    assert_web_then_worker(story(fw_dsn, corr_sync, 2), {"type": "user", "id": "22"}, corr_sync)
