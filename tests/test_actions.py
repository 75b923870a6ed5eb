"""record_action and list_actions against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ActorRef, ThreadlineConnection
from threadline.core.errors import InvalidAction, InvalidFilter, SchemaError

from .conftest import changes, transactions

Conn = psycopg.Connection[Any]


def test_fields_default_from_the_current_context(conn: Conn) -> None:
    ctx = {
        "actor": ActorRef.admin("7", "Ada"),
        "correlation_id": "req-9",
        "request_id": "r-9",
        "job": {"name": "refunds.issue", "id": "job-3"},
    }
    with threadline.context(**ctx):
        action = threadline.record_action(
            conn,
            "order.refund",
            status="done",
            verb="refund",
            category="billing",
            reason="damaged in transit",
            comment="line 1\nline 2",
            meta={"order": 7, "amount": "12.50"},
        )
    assert action.actor == ActorRef.admin("7", "Ada")
    assert (action.correlation_id, action.request_id, action.job_id) == ("req-9", "r-9", "job-3")
    assert (action.name, action.status, action.verb, action.category) == (
        "order.refund",
        "done",
        "refund",
        "billing",
    )
    assert action.reason == "damaged in transit" and action.comment == "line 1\nline 2"
    assert action.meta == {"order": 7, "amount": "12.50"} and action.inserted_at.tzinfo is timezone.utc
    assert transactions(conn) == []  # autocommit, no transaction to link: none is created
    plain = threadline.record_action(conn, "ping")
    assert (plain.actor, plain.correlation_id, plain.status) == (None, None, "ok")
    explicit = threadline.record_action(conn, "ping", actor="service_account:billing")
    assert explicit.actor == ActorRef.service_account("billing")


def test_action_recorded_before_the_first_write_is_linked(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:1", correlation_id="c-1"), threadline.transaction(conn):
        action = threadline.record_action(conn, "post.create")
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        conn.execute("UPDATE app.posts SET title = 't' WHERE id = 1")
    (tx,) = transactions(conn)
    assert tx["action_id"] == action.id and tx["correlation_id"] == "c-1"
    assert {c["transaction_id"] for c in changes(conn)} == {tx["id"]}


def test_action_recorded_after_the_first_write_is_linked(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:1"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        action = threadline.record_action(conn, "post.create")
        conn.execute("INSERT INTO app.posts (id) VALUES (2)")
    (tx,) = transactions(conn)
    assert tx["action_id"] == action.id
    assert len(changes(conn)) == 2


def test_the_first_action_of_a_transaction_is_the_linked_one(conn: Conn, posts: str) -> None:
    with threadline.transaction(conn):
        first = threadline.record_action(conn, "a")
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        second = threadline.record_action(conn, "b")
    (tx,) = transactions(conn)
    assert tx["action_id"] == first.id != second.id
    names = [a.name for a in threadline.list_actions(conn)]
    assert names == ["a", "b"]


def test_actions_of_one_transaction_page_through_after_the_last_id(conn: Conn) -> None:
    with threadline.transaction(conn):  # one transaction: every action has the same inserted_at
        ids = [threadline.record_action(conn, f"bulk.{i}").id for i in range(5)]
    seen: list[int] = []
    after = None
    while page := threadline.list_actions(conn, limit=2, after=after):
        seen += [a.id for a in page]
        after = page[-1].id
    assert seen == ids
    with pytest.raises(InvalidFilter, match="there is no action"):
        threadline.list_actions(conn, after=max(ids) + 1000)
    for bad in (0, -1, True, "3"):
        with pytest.raises(InvalidFilter, match="after must be the id of an action"):
            threadline.list_actions(conn, after=bad)  # type: ignore[arg-type]


def test_an_action_without_audited_writes_keeps_its_transaction_context(conn: Conn, posts: str) -> None:
    with threadline.context(actor="user:5", correlation_id="c-5", origin="web"), threadline.transaction(conn):
        action = threadline.record_action(conn, "report.view")
    (tx,) = transactions(conn)
    assert tx["action_id"] == action.id and tx["actor"] == {"type": "user", "id": "5"}
    assert tx["origin"] == "web" and changes(conn) == []


def test_rolled_back_actions_leave_nothing(conn: Conn, posts: str) -> None:
    with pytest.raises(ZeroDivisionError), threadline.transaction(conn):
        threadline.record_action(conn, "doomed")
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
        raise ZeroDivisionError
    assert threadline.list_actions(conn) == [] and transactions(conn) == []
    with threadline.transaction(conn):
        with pytest.raises(ZeroDivisionError), conn.transaction():  # a savepoint
            threadline.record_action(conn, "inner")
            raise ZeroDivisionError
        outer = threadline.record_action(conn, "outer")
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    (tx,) = transactions(conn)
    assert tx["action_id"] == outer.id
    assert [a.name for a in threadline.list_actions(conn)] == ["outer"]


def test_non_autocommit_and_automatic_mode_connections_link(dsn: str, conn: Conn, posts: str) -> None:
    with psycopg.connect(dsn) as plain:  # not autocommit: the action opens the transaction
        action = threadline.record_action(plain, "first")
        plain.execute("INSERT INTO app.posts (id) VALUES (1)")
        plain.commit()
    with ThreadlineConnection.connect(dsn) as auto, threadline.context(actor="user:3", correlation_id="c-3"):
        auto.execute("INSERT INTO app.posts (id) VALUES (2)")
        auto_action = threadline.record_action(auto, "second")
        auto.commit()
    first_tx, second_tx = transactions(conn)
    assert first_tx["action_id"] == action.id
    assert second_tx["action_id"] == auto_action.id and second_tx["correlation_id"] == "c-3"
    assert auto_action.correlation_id == "c-3"


def test_bad_actions_are_refused_before_writing(conn: Conn) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": ""}, "must not be empty"),
        ({"name": "x" * 300}, "limit is 256"),
        ({"name": "a\nb"}, "control characters"),
        ({"name": 5}, "must be a string"),
        ({"name": "ok", "status": ""}, "status must not be empty"),
        ({"name": "ok", "reason": "r" * 10_001}, "limit is 10000"),
        ({"name": "ok", "comment": "bell\x07"}, "control characters"),
        ({"name": "ok", "meta": {"when": object()}}, "meta"),
        ({"name": "ok", "meta": ["not", "a", "mapping"]}, "meta"),
        ({"name": "ok", "actor": "nobody"}, "actor"),
        ({"name": "ok", "audit_schema": "Bad Name"}, "not allowed"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidAction, match=message):
            threadline.record_action(conn, **kwargs)
    assert threadline.list_actions(conn) == []


def test_list_actions_filters(conn: Conn) -> None:
    with threadline.context(actor="admin:7", correlation_id="c-1"):
        threadline.record_action(conn, "order.refund")
        threadline.record_action(conn, "order.note")
    with threadline.context(actor="user:8", correlation_id="c-2"):
        threadline.record_action(conn, "order.refund")
    every = threadline.list_actions(conn)
    assert [(a.name, str(a.actor)) for a in every] == [
        ("order.refund", "admin:7"),
        ("order.note", "admin:7"),
        ("order.refund", "user:8"),
    ]
    assert [a.name for a in threadline.list_actions(conn, actor="admin:7", name="order.refund")] == [
        "order.refund"
    ]
    assert [str(a.actor) for a in threadline.list_actions(conn, correlation_id="c-2")] == ["user:8"]
    assert threadline.list_actions(conn, limit=1) == every[:1]
    hour = timedelta(hours=1)
    now = datetime.now(timezone.utc)
    assert threadline.list_actions(conn, since=now - hour, until=now + hour) == every
    assert threadline.list_actions(conn, since=now + hour) == []
    for bad in ({"limit": 0}, {"since": datetime(2024, 1, 1)}, {"actor": "x"}, {"name": ""}):
        with pytest.raises(InvalidFilter):
            threadline.list_actions(conn, **bad)


def test_async_twins(dsn: str, conn: Conn, posts: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            with threadline.context(actor="user:2", correlation_id="c-a"):
                async with threadline.transaction(aconn):
                    action = await threadline.record_action_async(aconn, "async.thing")
                    await aconn.execute("INSERT INTO app.posts (id) VALUES (1)")
            found = await threadline.list_actions_async(aconn, correlation_id="c-a")
            assert found == [action]
            (tx,) = transactions(conn)
            assert tx["action_id"] == action.id and tx["correlation_id"] == "c-a"

    asyncio.run(main())


@pytest.fixture
def app_dsn(dsn: str, conn: Conn, posts: str) -> Iterator[str]:
    """DSN of a least-privileged application role: read-only audit tables, INSERT on actions."""
    role = f"tl_actions_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(ident))
    conn.execute(sql.SQL("GRANT SELECT, INSERT ON app.posts TO {}").format(ident))
    threadline.ddl.install(conn, app_role=role)
    try:
        yield psycopg.conninfo.make_conninfo(dsn, user=role)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_a_least_privileged_role_records_linked_actions(app_dsn: str, conn: Conn) -> None:
    with psycopg.connect(app_dsn) as app, threadline.context(actor="user:9", correlation_id="c-9"):
        with threadline.transaction(app):
            before = threadline.record_action(app, "before.write")
            app.execute("INSERT INTO app.posts (id) VALUES (1)")
        with threadline.transaction(app):
            app.execute("INSERT INTO app.posts (id) VALUES (2)")
            after = threadline.record_action(app, "after.write")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("UPDATE threadline.transactions SET action_id = 1")
    first, second = transactions(conn)
    assert (first["action_id"], second["action_id"]) == (before.id, after.id)
    assert [c["transaction_id"] for c in changes(conn)] == [first["id"], second["id"]]


def test_an_audit_schema_without_link_action_is_reported(conn: Conn) -> None:
    threadline.ddl.install(conn, "audit_old")
    try:
        conn.execute("DROP FUNCTION audit_old.link_action(bigint)")
        assert (
            threadline.record_action(conn, "unlinked", audit_schema="audit_old").name == "unlinked"
        )  # autocommit
        with pytest.raises(SchemaError, match="threadline install"), conn.transaction():
            threadline.record_action(conn, "linked", audit_schema="audit_old")
    finally:
        conn.execute("DROP SCHEMA audit_old CASCADE")
