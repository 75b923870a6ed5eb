"""The demo's shop: a WSGI app and the Celery tasks it enqueues.

The worker subprocess imports this module (``celery -A threadline.demo.app worker``); both sides
read their configuration from the ``THREADLINE_DEMO_APP_*`` environment variables set by
:mod:`threadline.demo.runner`. Importing it registers the default broker's URL scheme
(:mod:`threadline.demo.filesystem`), in the worker too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery, chain, chord, group

import threadline
from threadline import ActorRef, ThreadlineConnection
from threadline.demo import filesystem

QUEUE = "threadline-demo"


def broker_options(broker: str, fs_root: str | None) -> dict[str, Any]:
    """Transport options; a filesystem broker needs its folders (created here, under ``fs_root``)."""
    if not filesystem.uses_folders(broker) or not fs_root:
        return {}
    return filesystem.transport_options(fs_root, create=True)


def make_app(broker: str, backend: str, fs_root: str | None = None) -> Celery:
    """The demo's Celery app, with threadline's propagation installed."""
    celery_app = Celery("threadline_demo", broker=broker, backend=backend)
    celery_app.conf.update(
        task_default_queue=QUEUE,
        broker_transport_options=broker_options(broker, fs_root),
        result_extended=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    threadline.celery.install(
        celery_app,
        default_actor=ActorRef.system("scheduler"),
        # the worker records every task attempt, so the trace names each task and its outcome
        record_task_runs=os.environ.get("THREADLINE_DEMO_APP_DSN"),
    )
    return celery_app


app = make_app(
    os.environ.get("THREADLINE_DEMO_APP_BROKER", "memory://"),
    os.environ.get("THREADLINE_DEMO_APP_BACKEND", "cache+memory://"),
    os.environ.get("THREADLINE_DEMO_APP_FS_ROOT"),
)


def _task(name: str) -> Callable[[Callable[..., Any]], Any]:
    """A Celery task of the demo app (returned as the Celery task object)."""
    decorator: Callable[[Callable[..., Any]], Any] = threadline.task(app=app, name=name)
    return decorator


def _dsn() -> str:
    return os.environ["THREADLINE_DEMO_APP_DSN"]


def _write(statement: str, params: Iterable[Any]) -> None:
    """One audited transaction on a fresh connection (the context comes from the task)."""
    with ThreadlineConnection.connect(_dsn()) as conn:
        conn.execute(statement, list(params))
        conn.commit()


@_task("demo.reserve_stock")
def reserve_stock(order_id: int) -> None:
    """Chain step 1: take the items out of stock."""
    _write("UPDATE demo.stock SET reserved = reserved + 1 WHERE sku = 'mug'", [])
    _write("UPDATE demo.orders SET status = 'reserved' WHERE id = %s", [order_id])


@_task("demo.charge_card")
def charge_card(order_id: int) -> None:
    """Chain step 2: charge the card (its number is masked in the audit trail)."""
    _write(
        "INSERT INTO demo.payments (order_id, amount, card) VALUES (%s, 12.50, '4111 1111 1111 1111')",
        [order_id],
    )
    _write("UPDATE demo.orders SET status = 'paid' WHERE id = %s", [order_id])


@_task("demo.notify")
def notify(order_id: int, channel: str) -> str:
    """Chord header: one notification per channel."""
    _write("INSERT INTO demo.notifications (order_id, channel) VALUES (%s, %s)", [order_id, channel])
    return channel


@_task("demo.notifications_done")
def notifications_done(channels: list[str], order_id: int) -> None:
    """Chord callback: runs once every notification was sent."""
    _write(
        "UPDATE demo.orders SET note = %s WHERE id = %s",
        [f"notified by {', '.join(sorted(channels))}", order_id],
    )


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def shop(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """``POST /orders``: write the order, then hand the rest to Celery."""
    with ThreadlineConnection.connect(_dsn()) as conn:
        row = conn.execute(
            "INSERT INTO demo.orders (item, status) VALUES ('mug', 'new') RETURNING id"
        ).fetchone()
        conn.commit()
    assert row is not None
    order_id = int(row[0])
    chain(reserve_stock.si(order_id), charge_card.si(order_id)).apply_async()
    chord(
        group(notify.si(order_id, ch) for ch in ("email", "sms")), notifications_done.s(order_id)
    ).apply_async()
    body = json.dumps({"order": order_id}).encode()
    start_response("201 Created", [("Content-Type", "application/json")])
    return [body]


def user_from_header(environ: dict[str, Any]) -> ActorRef | None:
    """The demo's "authentication": the user named in the ``X-User`` header."""
    name = environ.get("HTTP_X_USER")
    return ActorRef.user(name) if name else None


SCHEMA_SQL = """
CREATE SCHEMA demo;
CREATE TABLE demo.orders (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, item text, status text, note text);
CREATE TABLE demo.stock (sku text PRIMARY KEY, reserved int NOT NULL DEFAULT 0);
CREATE TABLE demo.payments (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id int, amount numeric, card text);
CREATE TABLE demo.notifications (order_id int, channel text, PRIMARY KEY (order_id, channel));
INSERT INTO demo.stock VALUES ('mug', 0);
"""
TRACKED: dict[str, list[str]] = {
    "demo.orders": [],
    "demo.stock": [],
    "demo.payments": ["card"],
    "demo.notifications": [],
}
"""Tracked tables and their masked columns."""
EXPECTED_TRANSACTIONS = 8
"""One web transaction, four from the chain, two notifications, one chord callback."""
