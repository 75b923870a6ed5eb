"""Retention (purge), coverage and the metrics hook, against the test database; the CLI as a
real subprocess."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ActorRef
from threadline.core.errors import CoverageError, RetentionError
from threadline.ops import health, observability, retention

from .conftest import sync_change_starts
from .test_cli import run


def _age(conn: psycopg.Connection[Any], days: int, where: str = "TRUE") -> None:
    """Make the matching changes (and their transactions) look ``days`` old."""
    conn.execute(
        f"UPDATE threadline.changes SET captured_at = captured_at - make_interval(days => {days}) WHERE {where}"
    )
    conn.execute(
        "UPDATE threadline.transactions t SET occurred_at = c.at FROM"
        " (SELECT transaction_id, min(captured_at) AS at FROM threadline.changes GROUP BY 1) c"
        " WHERE c.transaction_id = t.id"
    )
    sync_change_starts(conn)


def _counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM threadline.changes), (SELECT count(*) FROM threadline.transactions)"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture
def history(conn: psycopg.Connection[Any], posts: str) -> None:
    """10 old one-row transactions on app.posts, 1 old transaction touching posts and app.tags,
    and 2 recent transactions."""
    conn.execute("CREATE TABLE app.tags (id int PRIMARY KEY, name text)")
    threadline.ddl.track(conn, "app.tags")
    for i in range(10):
        conn.execute("INSERT INTO app.posts (id, title) VALUES (%s, 'old')", [i])
    with conn.transaction():
        conn.execute("INSERT INTO app.posts (id, title) VALUES (100, 'old both')")
        conn.execute("INSERT INTO app.tags VALUES (1, 'old tag')")
    _age(conn, 100)
    conn.execute("INSERT INTO app.posts (id, title) VALUES (200, 'new')")
    conn.execute("UPDATE app.posts SET title = 'new' WHERE id = 0")
    # two task attempts that ended 100 days ago, one that ended now
    conn.execute(
        "INSERT INTO threadline.task_runs (task_id, attempt, outcome, ended_at)"
        " VALUES ('t1', 0, 'retried', now() - interval '100 days'), ('t1', 1, 'failed', now() - interval '100 days'),"
        " ('t2', 0, 'succeeded', now())"
    )


def test_purge_deletes_old_changes_in_batches_then_emptied_transactions(
    conn: psycopg.Connection[Any], history: None, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[observability.Event] = []
    unsubscribe = observability.on_event(events.append)
    try:
        with caplog.at_level(logging.DEBUG, logger="threadline.retention"):
            result = retention.purge(conn, "90d", batch_size=3)
    finally:
        unsubscribe()
    assert (result.changes, result.transactions, result.task_runs, result.complete) == (12, 11, 2, True)
    assert result.batches == 5 + 4 + 1  # changes 3+3+3+3+0, transactions 3+3+3+2, task runs 2
    assert conn.execute("SELECT task_id FROM threadline.task_runs").fetchall() == [("t2",)]
    left = conn.execute("SELECT after->>'title', op FROM threadline.changes ORDER BY id").fetchall()
    assert left == [("new", "insert"), ("new", "update")]
    assert _counts(conn) == (2, 2)  # the recent transactions stay, with their changes
    assert any("purged 12 changes" in r.getMessage() for r in caplog.records)
    batches = [e for e in events if e.name == "purge.batch"]
    assert sum(e.fields["rows"] for e in batches if e.fields["kind"] == "changes") == 12
    assert [e.name for e in events][-1] == "purge.done"
    # rerun: nothing left to do
    assert retention.purge(conn, timedelta(days=90)).changes == 0


def test_dry_run_counts_and_deletes_nothing(conn: psycopg.Connection[Any], history: None) -> None:
    before = _counts(conn)
    result = retention.purge(conn, "90d", dry_run=True)
    assert (result.changes, result.transactions, result.task_runs, result.dry_run) == (12, 11, 2, True)
    assert _counts(conn) == before
    only_tags = retention.purge(conn, "90d", dry_run=True, table="app.tags")
    assert (only_tags.changes, only_tags.transactions) == (1, 0)  # its transaction keeps a posts change
    assert only_tags.task_runs == 0  # a purge of one table keeps the task runs


def test_table_filter_keeps_transactions_with_other_changes(
    conn: psycopg.Connection[Any], history: None
) -> None:
    result = retention.purge(conn, "90d", table="app.tags")
    assert (result.changes, result.transactions) == (1, 0)
    assert conn.execute("SELECT count(*) FROM threadline.changes WHERE table_name = 'tags'").fetchone() == (
        0,
    )
    # unqualified names resolve on the search path (app, public)
    assert retention.purge(conn, "90d", table="posts").changes == 11


def test_interrupted_purge_continues_on_rerun(conn: psycopg.Connection[Any], history: None) -> None:
    first = retention.purge(conn, "90d", batch_size=4, max_batches=2)
    assert (first.changes, first.complete) == (8, False)
    second = retention.purge(conn, "90d", batch_size=4)
    assert (second.changes, second.transactions, second.complete) == (4, 11, True)


def test_purge_refuses_bad_arguments(conn: psycopg.Connection[Any], posts: str) -> None:
    for kwargs in ({"batch_size": 0}, {"batch_size": True}, {"max_batches": 0}, {"pause": -1}):
        with pytest.raises(RetentionError):
            retention.purge(conn, "90d", **kwargs)
    for age in ("90", "ninety days", "-1d"):
        with pytest.raises(RetentionError):
            retention.purge(conn, age)
    with pytest.raises(RetentionError, match="does not exist on the search path and has no audit rows"):
        retention.purge(conn, "1d", table="nope")
    with conn.transaction(), pytest.raises(RetentionError, match="own transaction"):
        retention.purge(conn, "1d")


def test_purge_of_one_table_takes_its_changes_under_every_name_it_had(
    conn: psycopg.Connection[Any],
) -> None:
    conn.execute("CREATE TABLE app.orders_v1 (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE app.keep (id int PRIMARY KEY)")
    threadline.ddl.track(conn, "app.orders_v1")
    threadline.ddl.track(conn, "app.keep")
    conn.execute("INSERT INTO app.orders_v1 VALUES (1, 'a')")
    conn.execute("ALTER TABLE app.orders_v1 RENAME TO orders")
    conn.execute("INSERT INTO app.orders VALUES (2, 'b')")
    conn.execute("INSERT INTO app.keep VALUES (1)")
    with threadline.context(actor="admin:1"), threadline.transaction(conn):  # an action's transaction
        threadline.record_action(conn, "note", reason="kept")
    before = {r[0] for r in conn.execute("SELECT id FROM threadline.transactions").fetchall()}
    for name in ("app.orders_v1", "app.orders"):  # either name stands for the table
        dry = retention.purge(conn, timedelta(0), table=name, dry_run=True)
        assert (dry.changes, dry.transactions) == (2, 2)
    done = retention.purge(conn, timedelta(0), table="app.orders")
    assert (done.changes, done.transactions) == (2, 2)
    left = conn.execute("SELECT table_name FROM threadline.changes ORDER BY id").fetchall()
    assert left == [("keep",)]
    assert list(threadline.history(conn, "app.orders", 1)) == []
    # the transactions of the other table and of the action stay
    after = {r[0] for r in conn.execute("SELECT id FROM threadline.transactions").fetchall()}
    assert len(before) == 4 and len(before - after) == 2 and len(after) == 2, (before, after)


def test_purge_cli(dsn: str, conn: psycopg.Connection[Any], history: None) -> None:
    res = run("purge", "--older-than", "90d", "--dry-run", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    assert "would purge 12 changes, 11 transactions and 2 task runs" in res.stdout
    res = run("purge", "--older-than", "90d", "--batch-size", "5", "--json", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # 5+5+2 changes, 5+5+1 transactions, 2 task runs
    assert (out["changes"], out["transactions"], out["task_runs"], out["batches"]) == (12, 11, 2, 7)
    assert _counts(conn) == (2, 2)
    bad = run("purge", "--older-than", "soon", "--dsn", dsn)
    assert bad.returncode == 2 and "not an age" in bad.stderr
    down = run("purge", "--older-than", "1d", "--dsn", "postgresql://nobody@127.0.0.1:1/x")
    assert down.returncode == 1 and "Hint:" in down.stderr


def test_trigger_coverage_installed_enabled_current(conn: psycopg.Connection[Any], posts: str) -> None:
    conn.execute("CREATE TABLE app.plain (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE app.later (id int PRIMARY KEY, a text)")
    threadline.ddl.track(conn, "app.later")
    by_name = {t.name: t for t in health.trigger_coverage(conn, schemas=["app"])}
    assert by_name["app.posts"].status == "installed"
    assert by_name["app.plain"].status == "untracked" and not by_name["app.plain"].installed
    conn.execute("ALTER TABLE app.posts DISABLE TRIGGER threadline_capture_update")
    # with the DDL event trigger off, a renamed key column leaves the typed capture code outdated
    # (a new column would not: the code reads the whole row, and names only its key columns)
    conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl DISABLE")
    try:
        conn.execute("ALTER TABLE app.later RENAME COLUMN id TO later_id")
    finally:
        conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl ENABLE ALWAYS")
    by_name = {t.name: t for t in health.trigger_coverage(conn, schemas=["app"])}
    assert by_name["app.posts"].status == "disabled"
    assert by_name["app.posts"].triggers["update"] == "disabled"
    assert by_name["app.later"].status == "outdated" and by_name["app.later"].enabled
    problems = health.check_expected(
        conn, list(by_name.values()), ["posts", "app.later", "app.plain", "app.gone"]
    )
    assert [p.split(":")[0] for p in problems] == ["app.posts", "app.later", "app.plain", "app.gone"]
    with pytest.raises(CoverageError):
        health.check_expected(conn, [], ['"unbalanced'])


def test_context_coverage_per_origin_and_task(conn: psycopg.Connection[Any], posts: str) -> None:
    with threadline.context(actor=ActorRef.user("1"), correlation_id="c1", origin="web"):
        for i in range(3):
            with threadline.transaction(conn):
                conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
    with (
        threadline.context(origin="celery", job={"name": "app.tasks.sync", "id": "t1"}),
        threadline.transaction(conn),
    ):
        conn.execute("INSERT INTO app.posts (id) VALUES (10)")
    conn.execute("INSERT INTO app.posts (id) VALUES (11)")  # no context at all
    found = {(c.origin, c.task): c for c in health.context_coverage(conn)}
    web, task, bare = found[("web", None)], found[("celery", "app.tasks.sync")], found[(None, None)]
    assert (web.transactions, web.no_actor, web.no_correlation_id) == (3, 0, 0)
    assert (task.transactions, task.no_actor, task.no_correlation_share) == (1, 1, 1.0)
    assert bare.no_actor_share == 1.0
    assert next(iter(found)) != ("web", None)  # the groups missing context come first


def test_coverage_cli_is_a_ci_gate(dsn: str, conn: psycopg.Connection[Any], posts: str) -> None:
    conn.execute("CREATE TABLE app.plain (id int PRIMARY KEY)")
    res = run("coverage", "--expect", "app.posts", "--table-schema", "app", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    assert "app.posts  installed" in res.stdout and "app.plain" not in res.stdout
    res = run("coverage", "--expect", "app.posts,app.plain", "--json", "--dsn", dsn)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["problems"][0].startswith(
        "app.plain: untracked: capture is not installed"
    )
    assert run("coverage", "--expect", ",", "--dsn", dsn).returncode == 2
