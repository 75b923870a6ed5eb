"""Reading the audit trail back: timeline, history, actor history, as_of, trace, diff."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ActorRef, diff
from threadline.core.errors import (
    InvalidCursor,
    InvalidFilter,
    InvalidKey,
    QueryError,
    TableNotFound,
)
from threadline.core.records import TaskRun, Transaction
from threadline.explore import arguments
from threadline.explore.as_of_query import NotYetAudited, RowDeleted
from threadline.explore.diff import FieldChange, previous_row
from threadline.explore.trace_build import build_trace

from .conftest import changed_before
from .story import Story

Conn = psycopg.Connection[Any]


def _all(conn: Conn, **filters: Any) -> list[threadline.Change]:
    return list(threadline.timeline(conn, limit=10_000, **filters))


# ---------------------------------------------------------------------------------------------
# timeline


def test_timeline_by_correlation_id_has_the_request_and_every_task(conn: Conn, story: Story) -> None:
    page = threadline.timeline(conn, correlation_id="req-1")
    assert page.next_cursor is None
    ops = [(c.op, c.table_name, dict(c.pk or {})) for c in page]
    assert ops == [
        ("insert", "posts", {"id": 1}),
        ("insert", "posts", {"id": 2}),
        ("insert", "line_items", {"order_id": 7, "line_no": 1}),
        ("insert", "line_items", {"order_id": 7, "line_no": 2}),
        ("update", "posts", {"id": 1}),
        ("update", "posts", {"id": 1}),
        ("insert", "comments", {"id": 1}),
        ("delete", "posts", {"id": 2}),
        ("update", "line_items", {"order_id": 7, "line_no": 1}),
    ]
    keys = [(c.captured_at, c.id) for c in page]
    assert keys == sorted(keys)
    origins = {c.transaction.origin for c in page if c.transaction}
    assert origins == {"web", "celery"}
    jobs = [c.transaction.job["id"] for c in page if c.transaction and c.transaction.job]
    assert jobs == ["task-a", "task-a", "task-b", "task-c", "task-c"]
    first = page[0]
    assert first.transaction is not None and first.transaction.actor == ActorRef.user("42")
    assert first.captured_at.tzinfo is timezone.utc and first.transaction.occurred_at.tzinfo is timezone.utc
    assert first.transaction.request_id == "r-1" and first.table == "app.posts"
    assert all(c.transaction.correlation_id == "req-1" for c in page if c.transaction)


def test_timeline_pages_with_an_opaque_cursor(conn: Conn, story: Story) -> None:
    everything = _all(conn)
    assert len(everything) == 10
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        page = threadline.timeline(conn, limit=3, after=cursor)
        pages += 1
        seen.extend(c.id for c in page)
        cursor = page.next_cursor
        if cursor is None:
            break
        assert len(page) == 3
    assert seen == [c.id for c in everything] and pages == 4
    # exactly one page: no cursor
    assert threadline.timeline(conn, limit=10).next_cursor is None


def test_timeline_cursor_is_bound_to_its_filters_and_checked(conn: Conn, story: Story) -> None:
    page = threadline.timeline(conn, correlation_id="req-1", limit=2)
    assert page.next_cursor
    with pytest.raises(InvalidCursor, match="other filters"):
        threadline.timeline(conn, correlation_id="req-2", after=page.next_cursor)
    # time filters may change between pages (relative --since in the CLI)
    later = threadline.timeline(
        conn, correlation_id="req-1", after=page.next_cursor, since=datetime(2000, 1, 1, tzinfo=timezone.utc)
    )
    assert [c.id for c in later] == [c.id for c in _all(conn, correlation_id="req-1")][2:]
    for bad in ("", "nope", "eyJ2IjoyfQ", "x" * 600, page.next_cursor[:-3]):
        with pytest.raises(InvalidCursor):
            threadline.timeline(conn, correlation_id="req-1", after=bad)


def test_timeline_filters(conn: Conn, story: Story) -> None:
    posts = _all(conn, table="app.posts")
    assert {c.table_name for c in posts} == {"posts"} and len(posts) == 6
    assert _all(conn, table="posts") == posts  # on the search path
    assert [c.op for c in _all(conn, op="delete")] == ["delete"]
    by_7 = _all(conn, actor="user:7")
    assert (
        len(by_7) == 1 and by_7[0].transaction is not None and by_7[0].transaction.correlation_id == "req-2"
    )
    assert _all(conn, actor=ActorRef.user("42"), op="insert", table="app.comments")[0].pk == {"id": 1}
    assert _all(conn, actor="user:404") == []
    everything = _all(conn)
    middle = everything[4].captured_at
    assert [c.id for c in _all(conn, since=middle)] == [c.id for c in everything[4:]]
    assert [c.id for c in _all(conn, until=middle)] == [c.id for c in everything[:4]]
    assert _all(conn, since=middle, until=middle) == []


def test_timeline_rejects_bad_filters_before_reading(conn: Conn, story: Story) -> None:
    naive = datetime(2024, 1, 1)
    cases: list[tuple[dict[str, Any], type[QueryError], str]] = [
        ({"since": naive}, InvalidFilter, "naive"),
        ({"until": naive}, InvalidFilter, "naive"),
        (
            {
                "since": datetime(2024, 2, 1, tzinfo=timezone.utc),
                "until": datetime(2024, 1, 1, tzinfo=timezone.utc),
            },
            InvalidFilter,
            "is after",
        ),
        ({"op": "upsert"}, InvalidFilter, "not one of"),
        ({"limit": 0}, InvalidFilter, "positive"),
        ({"limit": 10_001}, InvalidFilter, "larger"),
        ({"limit": True}, InvalidFilter, "positive"),
        ({"actor": "nobody"}, InvalidFilter, "actor"),
        ({"correlation_id": "a\nb"}, InvalidFilter, "control"),
        ({"correlation_id": ""}, InvalidFilter, "empty"),
        ({"table": "app.nothing_here"}, TableNotFound, "does not exist"),
        ({"table": "a.b.c"}, TableNotFound, "schema"),
        ({"audit_schema": "Bad Name"}, InvalidFilter, "not allowed"),
    ]
    for filters, error, message in cases:
        with pytest.raises(error, match=message):
            threadline.timeline(conn, **filters)
    assert issubclass(InvalidFilter, ValueError)


# ---------------------------------------------------------------------------------------------
# history


def test_history_of_a_row_is_newest_first_and_takes_any_key_form(conn: Conn, story: Story) -> None:
    changes = threadline.history(conn, "app.posts", 1)
    assert [c.op for c in changes] == ["update", "update", "update", "insert"]
    assert [c.transaction_id for c in changes] == [story.tx[k] for k in ("other", "a1", "a0", "web")]
    assert changed_before(changes[0]) == {"body": "first"} and changes[0].changed_fields == ("body",)
    assert threadline.history(conn, "posts", "1") == changes  # text key converted to the column type
    assert threadline.history(conn, "app.posts", {"id": 1}) == changes
    assert threadline.history(conn, "app.posts", (1,)) == changes
    assert threadline.history(conn, "app.posts", 1, limit=1) == changes[:1]
    assert threadline.history(conn, "app.posts", 999) == []


def test_history_of_a_composite_key(conn: Conn, story: Story) -> None:
    expected = [("update", {"qty": 2}), ("insert", None)]
    for pk in ({"order_id": 7, "line_no": 1}, {"line_no": "1", "order_id": "7"}, (7, 1)):
        got = threadline.history(conn, "app.line_items", pk)
        assert [(c.op, c.before and changed_before(c)) for c in got] == expected
    assert threadline.history(conn, "app.line_items", {"order_id": 7, "line_no": 2})[0].op == "insert"


def test_history_rejects_bad_keys(conn: Conn, story: Story) -> None:
    for table, pk, message in [
        ("app.line_items", 7, "composite key"),
        ("app.line_items", {"order_id": 7}, "keyed by"),
        ("app.line_items", (7,), "got 1 value"),
        ("app.posts", "abc", "not a valid int"),
        ("app.posts", None, "cannot be None"),
        ("app.posts", True, "bool"),
        ("app.posts", {}, "must map"),
        ("app.posts", 1.5, "not a valid int"),
        ("app.posts", [object()], "not a valid int"),
    ]:
        with pytest.raises(InvalidKey, match=message):
            threadline.history(conn, table, pk)
    with pytest.raises(TableNotFound):
        threadline.history(conn, "app.missing", 1)


def test_history_key_types_text_uuid_and_numeric(conn: Conn) -> None:
    conn.execute(
        "CREATE TABLE app.things (code text, ref uuid, amount numeric, PRIMARY KEY (code, ref, amount))"
    )
    threadline.ddl.track(conn, "app.things")
    ref = "0b6c2a3e-58f0-4a77-9f55-1b4c0c6d7e10"
    conn.execute("INSERT INTO app.things VALUES ('42', %s, 1.5)", [ref])
    assert (
        len(threadline.history(conn, "app.things", {"code": 42, "ref": ref.upper(), "amount": "1.50"})) == 1
    )
    with pytest.raises(InvalidKey, match="uuid"):
        threadline.history(conn, "app.things", {"code": "42", "ref": "zzz", "amount": 1})


def test_history_of_number_keys_exact_and_not_finite(conn: Conn) -> None:
    # a numeric key holds more digits than a float, and NaN and the infinities, which a change's
    # pk holds as PostgreSQL writes them ("NaN", "Infinity", "-Infinity"); a float8 key likewise
    conn.execute("CREATE TABLE app.measured (n numeric, f float8, PRIMARY KEY (n, f))")
    threadline.ddl.track(conn, "app.measured")
    conn.execute(
        "INSERT INTO app.measured VALUES ('12345678901234567890.123', 1), ('NaN', 'Infinity'),"
        " ('-Infinity', 'NaN'), (2.50, -0.5)"
    )
    for key in [
        {"n": Decimal("12345678901234567890.123"), "f": 1},
        {"n": "12345678901234567890.1230", "f": "1"},
        {"n": Decimal("NaN"), "f": float("inf")},
        {"n": "nan", "f": "Infinity"},
        {"n": float("-inf"), "f": float("nan")},
        {"n": "-Infinity", "f": Decimal("NaN")},
        {"n": Decimal("2.5"), "f": -0.5},
    ]:
        assert [c.op for c in threadline.history(conn, "app.measured", key)] == ["insert"], key
    assert threadline.history(conn, "app.measured", {"n": "12345678901234567890.124", "f": 1}) == []
    with pytest.raises(InvalidKey, match="not a valid number"):
        threadline.history(conn, "app.measured", {"n": "1.2.3", "f": 1})


def test_history_of_a_dropped_table_needs_its_audit_rows(conn: Conn, story: Story) -> None:
    conn.execute("DROP TABLE app.comments")
    changes = threadline.history(conn, "app.comments", 1)
    assert [c.op for c in changes] == ["insert"] and changes[0].after == {
        "id": 1,
        "post_id": 1,
        "body": "nice",
    }
    assert len(threadline.history(conn, "comments", "1")) == 1  # key type learned from the audit rows
    conn.execute("CREATE TABLE app.never_audited (id int PRIMARY KEY)")
    assert threadline.history(conn, "app.never_audited", 1) == []  # exists: an empty answer
    conn.execute("DROP TABLE app.never_audited")
    with pytest.raises(TableNotFound, match="no audit rows"):
        threadline.history(conn, "app.never_audited", 1)


def test_history_uses_the_tracked_key_columns(conn: Conn) -> None:
    conn.execute("CREATE TABLE app.nokey (code text, v int)")
    threadline.ddl.track(conn, "app.nokey", keys=["code"])
    conn.execute("INSERT INTO app.nokey VALUES ('x', 1)")
    conn.execute("UPDATE app.nokey SET v = 2")
    assert [c.op for c in threadline.history(conn, "app.nokey", "x")] == ["update", "insert"]


def _key_index_scans(dsn: str) -> int:
    """Scans of the key index of changes (and of its partitions' indexes), as the server counts them."""
    with psycopg.connect(dsn, autocommit=True) as reader:
        row = reader.execute(
            "SELECT coalesce(sum(s.idx_scan), 0) FROM pg_stat_all_indexes s"
            " WHERE s.indexrelid = 'threadline.changes_key_idx'::regclass OR s.indexrelid IN"
            " (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'threadline.changes_key_idx'::regclass)"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_rows_changes_are_found_through_the_key_index_and_never_a_neighbours(
    conn: Conn, dsn: str, posts: str
) -> None:
    # two keys whose hashes are equal: each row's reads must still show its own changes only
    a, b = conn.execute(
        "SELECT min(g), max(g) FROM generate_series(1, 200000) g"
        " GROUP BY jsonb_hash(jsonb_build_object('id', g)) HAVING count(*) > 1 ORDER BY 1 LIMIT 1"
    ).fetchone()
    conn.execute("INSERT INTO app.posts (id, title) SELECT g, 'x' FROM generate_series(1, 3000) g")
    conn.execute("INSERT INTO app.posts (id, title) VALUES (%s, 'a'), (%s, 'b')", [a, b])
    for n in range(3):
        conn.execute("UPDATE app.posts SET views = %s WHERE id = %s", [n + 1, a])
    conn.execute("UPDATE app.posts SET title = 'b2' WHERE id = %s", [b])
    conn.execute("ANALYZE threadline.changes")
    before = _key_index_scans(dsn)
    assert [(c.op, c.pk) for c in threadline.history(conn, "app.posts", a)] == [("update", {"id": a})] * 3 + [
        ("insert", {"id": a})
    ]
    assert [c.after["title"] for c in threadline.history(conn, "app.posts", b)] == ["b2", "b"]
    assert threadline.as_of(conn, "app.posts", b, datetime.now(timezone.utc))["title"] == "b2"
    conn.execute("SELECT pg_stat_force_next_flush()")
    assert _key_index_scans(dsn) >= before + 3


# ---------------------------------------------------------------------------------------------
# actor_history and changes_for_transaction


def test_actor_history_within_a_window(conn: Conn, story: Story) -> None:
    mine = threadline.actor_history(conn, "user:42")
    assert len(mine) == 9
    keys = [(c.captured_at, c.id) for c in mine]
    assert keys == sorted(keys, reverse=True)
    assert threadline.actor_history(conn, ActorRef.user("42"), limit=2) == mine[:2]
    assert [c.transaction_id for c in threadline.actor_history(conn, "user:7")] == [story.tx["other"]]
    cut = mine[3].captured_at
    assert threadline.actor_history(conn, "user:42", since=cut) == mine[:4]
    assert threadline.actor_history(conn, "user:42", until=cut) == mine[4:]
    assert threadline.actor_history(conn, "user:42", datetime.now(timezone.utc) + timedelta(hours=1)) == []
    with pytest.raises(InvalidFilter):
        threadline.actor_history(conn, "user:42", since=datetime(2024, 1, 1))
    with pytest.raises(InvalidFilter, match="required"):
        threadline.actor_history(conn, None)  # type: ignore[arg-type]


def test_actor_history_of_an_anonymous_actor(conn: Conn, posts: str) -> None:
    with threadline.context(actor=ActorRef.anonymous()), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (5)")
    with threadline.context(actor=ActorRef.anonymous("sess-1")), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (6)")
    assert [c.pk for c in threadline.actor_history(conn, "anonymous")] == [{"id": 5}]
    assert [c.pk for c in threadline.actor_history(conn, "anonymous:sess-1")] == [{"id": 6}]


def test_changes_for_transaction(conn: Conn, story: Story) -> None:
    changes = threadline.changes_for_transaction(conn, story.tx["c"])
    assert [(c.op, c.table_name) for c in changes] == [("delete", "posts"), ("update", "line_items")]
    assert changes[0].transaction is changes[1].transaction  # one record per transaction
    tx = changes[0].transaction
    assert tx is not None and tx.job_id == "task-c" and tx.causation_id == "task-x"
    assert json.loads(json.dumps(changes[0].to_dict()))["transaction"]["job"]["parent_id"] == "task-x"
    assert threadline.changes_for_transaction(conn, 10**12) == []
    with pytest.raises(InvalidFilter):
        threadline.changes_for_transaction(conn, "1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# as_of


def test_as_of_rebuilds_the_row_at_each_point(conn: Conn, story: Story) -> None:
    history = list(reversed(threadline.history(conn, "app.posts", 1)))  # oldest first
    for change in history:
        assert threadline.as_of(conn, "app.posts", 1, change.captured_at) == change.after
        just_before = change.captured_at - timedelta(microseconds=1)
        if change.op == "insert":
            with pytest.raises(NotYetAudited, match="did not exist yet") as info:
                threadline.as_of(conn, "app.posts", 1, just_before)
            assert info.value.first_change == change
    now = datetime.now(timezone.utc)
    assert threadline.as_of(conn, "posts", "1", now) == {
        "id": 1,
        "title": "Hello!",
        "body": "edited",
        "secret": None,
        "views": 1,
    }


def test_as_of_a_deleted_row_raises_row_deleted(conn: Conn, story: Story) -> None:
    (delete, insert) = threadline.history(conn, "app.posts", 2)
    assert threadline.as_of(conn, "app.posts", 2, insert.captured_at)["title"] == "Draft"
    with pytest.raises(RowDeleted) as info:
        threadline.as_of(conn, "app.posts", 2, datetime.now(timezone.utc))
    assert info.value.change == delete and info.value.deleted_at == delete.captured_at
    assert isinstance(info.value, LookupError)


def test_as_of_after_a_truncate_raises_row_deleted(conn: Conn, posts: str) -> None:
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
    before_truncate = datetime.now(timezone.utc)
    conn.execute("TRUNCATE app.posts")
    assert threadline.as_of(conn, "app.posts", 1, before_truncate)["title"] == "a"
    with pytest.raises(RowDeleted, match="truncated"):
        threadline.as_of(conn, "app.posts", 1, datetime.now(timezone.utc))
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'again')")
    assert threadline.as_of(conn, "app.posts", 1, datetime.now(timezone.utc))["title"] == "again"


def test_as_of_without_captured_changes(conn: Conn, story: Story) -> None:
    with pytest.raises(NotYetAudited, match="no captured change at all") as info:
        threadline.as_of(conn, "app.posts", 404, datetime.now(timezone.utc))
    assert info.value.first_change is None
    with pytest.raises(InvalidFilter, match="naive"):
        threadline.as_of(conn, "app.posts", 1, datetime(2024, 1, 1))


# ---------------------------------------------------------------------------------------------
# diff


def test_diff_of_each_operation(conn: Conn, story: Story) -> None:
    update, *_, insert = threadline.history(conn, "app.posts", 1)
    assert diff(update) == [FieldChange("body", "first", "edited")]
    assert diff(update)[0] == ("body", "first", "edited")  # plain tuples too
    assert previous_row(update) == {**dict(update.after or {}), "body": "first"}
    assert ("title", None, "Hello") in diff(insert) and previous_row(insert) is None
    (delete, _) = threadline.history(conn, "app.posts", 2)
    assert ("title", "Draft", None) in diff(delete) and previous_row(delete) == delete.before
    conn.execute("TRUNCATE app.comments")
    (truncate,) = _all(conn, op="truncate")
    assert diff(truncate) == [] and truncate.pk is None
    threadline.take_baseline(conn, "app.posts")  # a snapshot shows the row as it was then
    snapshot = threadline.history(conn, "app.posts", 1)[0]
    assert snapshot.op == "snapshot" and ("body", None, "edited") in diff(snapshot)


# ---------------------------------------------------------------------------------------------
# trace


def test_trace_tree_request_tasks_transactions_changes(conn: Conn, story: Story) -> None:
    found = threadline.trace(conn, "req-1")
    assert found.transaction_count == 5 and found.change_count == 9
    (request,) = found.roots
    assert (request.kind, request.id, request.origin) == ("request", "r-1", "web")
    assert [t.transaction.id for t in request.transactions] == [story.tx["web"]]
    assert [a.name for a in request.actions] == ["post.publish"]
    (task_a,) = request.children
    assert (task_a.kind, task_a.id, task_a.name) == ("task", "task-a", "posts.sync")
    assert task_a.attempts == (0, 1)  # the retry is in the same node
    assert [t.transaction.id for t in task_a.transactions] == [story.tx["a0"], story.tx["a1"]]
    assert [a.name for a in task_a.actions] == ["sync.start"]
    assert [(c.id, c.name) for c in task_a.children] == [("task-b", "posts.notify"), ("task-x", None)]
    task_b, task_x = task_a.children
    assert task_b.change_count == 1 and task_b.children == ()
    assert task_x.transactions == () and task_x.started_at is None  # wrote nothing, kept for shape
    (task_c,) = task_x.children
    assert task_c.id == "task-c" and [c.op for c in task_c.transactions[0].changes] == ["delete", "update"]
    # timings
    assert found.started_at == request.started_at and found.duration is not None
    assert request.span_ended_at == found.ended_at and task_a.started_at is not None
    assert request.started_at is not None and task_a.started_at >= request.started_at
    assert task_x.span_started_at == task_c.started_at
    assert found.task_count == 4
    assert json.loads(json.dumps(found.to_dict()))["roots"][0]["children"][0]["id"] == "task-a"


def test_trace_renders_as_text(conn: Conn, story: Story) -> None:
    text = threadline.trace(conn, "req-1").render()
    lines = text.splitlines()
    assert lines[0].startswith("correlation req-1  5 transactions  9 changes  4 tasks")
    assert lines[1].startswith("request r-1  web  user:42  +0.000s")
    assert any("task posts.sync [task-a]  celery  user:42  2 attempts" in line for line in lines)
    assert any("└─ task posts.cleanup [task-c]" in line for line in lines)
    assert any("task (unknown name) [task-x]  (no audited writes)" in line for line in lines)
    assert any(line.strip().endswith("update app.posts id=1  title") for line in lines)
    assert any("attempt 2" in line for line in lines)
    assert any("action post.publish (ok)  user:42  launch" in line for line in lines)
    short = threadline.trace(conn, "req-1").render(max_changes=1)
    assert "… 3 more changes" in short


def test_trace_of_unknown_or_other_ids(conn: Conn, story: Story) -> None:
    empty = threadline.trace(conn, "req-404")
    assert empty.empty and empty.roots == () and empty.duration is None
    assert empty.render().startswith("correlation req-404  0 transactions")
    (root,) = threadline.trace(conn, "req-2").roots
    assert (root.kind, root.id, root.children) == ("request", "r-2", ())
    with pytest.raises(InvalidFilter):
        threadline.trace(conn, "")


def test_trace_of_a_beat_task_and_plain_work(conn: Conn, posts: str) -> None:
    beat = {"correlation_id": "root-1", "origin": "celery", "actor": ActorRef.system("beat")}
    nightly = {"name": "nightly", "id": "root-1", "retries": 0, "root_id": "root-1"}
    with threadline.context(**beat, job=nightly), threadline.transaction(conn):
        conn.execute("INSERT INTO app.posts (id) VALUES (1)")
    with (
        threadline.context(correlation_id="root-1", origin="cli", causation_id="root-1"),
        threadline.transaction(conn),
    ):
        conn.execute("INSERT INTO app.posts (id) VALUES (2)")
    found = threadline.trace(conn, "root-1")
    (root,) = found.roots
    assert (root.kind, root.name) == ("task", "nightly")
    (work,) = root.children
    assert (work.kind, work.name, work.id) == ("work", "cli", "root-1")
    assert "cli caused by root-1" in found.render()


def test_trace_survives_forged_parent_cycles() -> None:
    now = datetime.now(timezone.utc)

    def tx(ident: int, job_id: str, parent: str) -> Transaction:
        return Transaction(
            id=ident,
            xid=ident,
            occurred_at=now + timedelta(seconds=ident),
            actor=None,
            correlation_id="c",
            request_id=None,
            causation_id=parent,
            origin="celery",
            job={"id": job_id, "parent_id": parent, "root_id": parent},
            action_id=None,
            meta=None,
            context_error=None,
        )

    found = build_trace("c", [tx(1, "a", "b"), tx(2, "b", "a"), tx(3, "c", "c")], [])
    ids = sorted(n.id or "" for n in found.walk())
    assert ids == ["a", "b", "c"] and found.transaction_count == 3
    assert found.render()


def test_a_tasks_runs_are_in_attempt_order_whatever_order_they_ended_in() -> None:
    # a thread pool can end (and record) an attempt retried without a countdown after the next one
    now = datetime.now(timezone.utc)

    def run(ident: int, attempt: int, outcome: str, ended: int) -> TaskRun:
        return TaskRun(
            id=ident,
            task_id="t",
            name="app.give_up",
            attempt=attempt,
            outcome=outcome,
            error=None,
            correlation_id="c",
            causation_id=None,
            parent_id=None,
            root_id="t",
            actor=None,
            worker="w",
            started_at=now,
            ended_at=now + timedelta(milliseconds=ended),
        )

    found = build_trace(
        "c", [], [], runs=[run(1, 0, "retried", 1), run(2, 2, "failed", 2), run(3, 1, "retried", 3)]
    )
    (node,) = [n for n in found.walk() if n.kind == "task"]
    assert [(r.attempt, r.outcome) for r in node.runs] == [(0, "retried"), (1, "retried"), (2, "failed")]
    assert node.outcome == "failed"


# ---------------------------------------------------------------------------------------------
# async twins and custom audit schemas


def test_async_twins_give_the_same_answers(conn: Conn, story: Story) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(story.dsn, autocommit=True) as aconn:
            page = await threadline.timeline_async(aconn, correlation_id="req-1", limit=4)
            assert [c.id for c in page] == [c.id for c in _all(conn, correlation_id="req-1")][:4]
            rest = await threadline.timeline_async(aconn, correlation_id="req-1", after=page.next_cursor)
            assert len(rest) == 5
            assert await threadline.history_async(aconn, "app.posts", 1) == threadline.history(
                conn, "app.posts", 1
            )
            assert await threadline.actor_history_async(aconn, "user:7") == threadline.actor_history(
                conn, "user:7"
            )
            now = datetime.now(timezone.utc)
            assert (await threadline.as_of_async(aconn, "app.posts", 1, now))["views"] == 1
            with pytest.raises(RowDeleted):
                await threadline.as_of_async(aconn, "app.posts", 2, now)
            changes = await threadline.changes_for_transaction_async(aconn, story.tx["b"])
            assert [c.table_name for c in changes] == ["comments"]
            found = await threadline.trace_async(aconn, "req-1")
            assert found.render() == threadline.trace(conn, "req-1").render()

    asyncio.run(main())


def test_queries_read_another_audit_schema(conn: Conn) -> None:
    threadline.ddl.install(conn, "audit_q")
    try:
        conn.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
        threadline.ddl.track(conn, "app.t", audit_schema="audit_q")
        with threadline.context(correlation_id="q-1"), threadline.transaction(conn):
            conn.execute("INSERT INTO app.t VALUES (1, 'x')")
        assert [c.op for c in threadline.timeline(conn, correlation_id="q-1", audit_schema="audit_q")] == [
            "insert"
        ]
        assert len(threadline.timeline(conn, correlation_id="q-1")) == 0
        assert len(threadline.history(conn, "app.t", 1, audit_schema="audit_q")) == 1
        assert threadline.trace(conn, "q-1", audit_schema="audit_q").change_count == 1
    finally:
        conn.execute("DROP TABLE IF EXISTS app.t")
        conn.execute("DROP SCHEMA audit_q CASCADE")


def test_queries_inside_an_open_transaction_leave_it_usable(conn: Conn, story: Story) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id, title) VALUES (3, 'in flight')")
        with pytest.raises(QueryError):
            threadline.history(conn, "app.posts", "not-a-number")
        assert [c.op for c in threadline.history(conn, "app.posts", 3)] == ["insert"]  # own writes visible
        conn.execute("UPDATE app.posts SET title = 'landed' WHERE id = 3")
    assert [c.op for c in threadline.history(conn, "app.posts", 3)] == ["update", "insert"]
    assert arguments.check_time(
        "t", datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    ) == datetime(2024, 1, 1, 10, tzinfo=timezone.utc)
