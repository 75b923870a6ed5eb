"""A small audited story written through the real capture path, for the query tests.

Request ``req-1`` (web, ``user:42``) creates two posts and two line items and records an action;
Celery task ``task-a`` (published by the request) updates post 1, fails and retries; ``task-b``
(child of ``task-a``) adds a comment; ``task-x`` (child of ``task-a``) writes nothing but publishes
``task-c``, which deletes post 2 and changes a line item. Request ``req-2`` (``user:7``) edits
post 1 afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

import threadline
from threadline import ActorRef, ThreadlineConnection, ddl


@dataclass
class Story:
    """Ids of what :func:`write_story` wrote."""

    dsn: str
    tx: dict[str, int] = field(default_factory=dict)
    """Transaction ids by label: web, a0, a1, b, c, other."""
    actions: dict[str, int] = field(default_factory=dict)


def job(
    name: str, ident: str, *, retries: int = 0, parent: str | None = None, root: str = "task-a"
) -> dict[str, Any]:
    """A job dict shaped like the one the Celery integration records."""
    return {"name": name, "id": ident, "retries": retries, "parent_id": parent, "root_id": root}


def _last_tx(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT max(id) FROM threadline.transactions").fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def write_story(conn: psycopg.Connection[Any], dsn: str) -> Story:
    """Create the tables of the story (``app.posts`` must exist and be tracked) and write it."""
    conn.execute("CREATE TABLE app.comments (id int PRIMARY KEY, post_id int, body text)")
    conn.execute(
        "CREATE TABLE app.line_items (order_id int, line_no int, qty int, PRIMARY KEY (order_id, line_no))"
    )
    ddl.track(conn, "app.comments")
    ddl.track(conn, "app.line_items")
    story = Story(dsn)
    web = {"actor": ActorRef.user("42"), "correlation_id": "req-1", "request_id": "r-1", "origin": "web"}
    with threadline.context(**web), threadline.transaction(conn):
        conn.execute(
            "INSERT INTO app.posts (id, title, body) VALUES (1, 'Hello', 'first'), (2, 'Draft', 'tbd')"
        )
        conn.execute("INSERT INTO app.line_items VALUES (7, 1, 2), (7, 2, 1)")
        story.actions["publish"] = threadline.record_action(conn, "post.publish", reason="launch").id
    story.tx["web"] = _last_tx(conn)

    worker = {"actor": ActorRef.user("42"), "correlation_id": "req-1", "origin": "celery"}
    with (
        threadline.context(**worker, causation_id="r-1", job=job("posts.sync", "task-a")),
        threadline.transaction(conn),
    ):
        story.actions["sync"] = threadline.record_action(conn, "sync.start").id  # before any write
        conn.execute("UPDATE app.posts SET title = 'Hello!' WHERE id = 1")
    story.tx["a0"] = _last_tx(conn)
    with (
        threadline.context(**worker, causation_id="r-1", job=job("posts.sync", "task-a", retries=1)),
        threadline.transaction(conn),
    ):
        conn.execute("UPDATE app.posts SET views = views + 1 WHERE id = 1")
    story.tx["a1"] = _last_tx(conn)

    # task-b runs on an automatic-mode connection, as a worker's pool would
    notify = job("posts.notify", "task-b", parent="task-a")
    with (
        ThreadlineConnection.connect(dsn) as wconn,
        threadline.context(**worker, causation_id="task-a", job=notify),
    ):
        wconn.execute("INSERT INTO app.comments VALUES (1, 1, 'nice')")
        wconn.commit()
    story.tx["b"] = _last_tx(conn)

    with (
        threadline.context(
            **worker, causation_id="task-x", job=job("posts.cleanup", "task-c", parent="task-x")
        ),
        threadline.transaction(conn),
    ):
        conn.execute("DELETE FROM app.posts WHERE id = 2")
        conn.execute("UPDATE app.line_items SET qty = 3 WHERE order_id = 7 AND line_no = 1")
    story.tx["c"] = _last_tx(conn)

    other = {"actor": ActorRef.user("7"), "correlation_id": "req-2", "request_id": "r-2", "origin": "web"}
    with threadline.context(**other), threadline.transaction(conn):
        conn.execute("UPDATE app.posts SET body = 'edited' WHERE id = 1")
    story.tx["other"] = _last_tx(conn)
    return story
