"""Every Celery path keeps the audit context: a real worker, real brokers, real audit rows.

One worker per (broker, pool): Redis and RabbitMQ, prefork and threads (two each). Each test
publishes under a web-like context and asserts on the ``threadline.transactions`` rows the worker
wrote: actor, correlation id, causation, origin and job. Without the servers, the same workers run
on the filesystem fallback transport (``tests/brokers.py``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery, chain, chord, group

import threadline
from threadline import ActorRef

from .celery_app import tasks
from .celery_app.harness import Worker, env_var, setup_events_table, wait_row_list, wait_rows

USER = {"type": "user", "id": "7"}
DEFAULT = tasks.DEFAULT_ACTOR.to_dict()


class Env:
    """A running worker, a client app for its queue, and the test database."""

    def __init__(self, worker: Worker, app: Celery, dsn: str) -> None:
        self.worker, self.app, self.dsn = worker, app, dsn

    def prefix(self) -> str:
        return f"{self.worker.broker_name}-{self.worker.pool}-{uuid.uuid4().hex[:10]}"

    def rows(self, prefix: str, count: int, **kwargs: Any) -> dict[str, dict[str, Any]]:
        return wait_rows(self.dsn, prefix, count, worker=self.worker, **kwargs)


@pytest.fixture(scope="module")
def celery_dsn(database: str) -> Iterator[str]:
    setup_events_table(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture(
    scope="module",
    params=[("redis", "prefork"), ("redis", "threads"), ("amqp", "prefork"), ("amqp", "threads")],
    ids=lambda p: "-".join(p),
)
def env(
    request: pytest.FixtureRequest, celery_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    broker, pool = request.param
    worker = Worker(broker, pool, celery_dsn, Path(tmp_path_factory.mktemp("celery"))).start()
    app = worker.app()
    app.set_current()
    try:
        yield Env(worker, app, celery_dsn)
    finally:
        worker.stop()
        threadline.celery.uninstall(app)


@pytest.fixture
def web() -> Iterator[threadline.AuditContext]:
    """The context of a web request that enqueues work."""
    req = f"req-{uuid.uuid4().hex[:8]}"
    with threadline.context(
        actor=ActorRef.user("7"), correlation_id=f"corr-{req}", request_id=req, origin="web"
    ) as ctx:
        yield ctx
    assert threadline.current().is_empty


def job(row: dict[str, Any]) -> dict[str, Any]:
    return dict(row["job"])


def assert_inherited(row: dict[str, Any], web: threadline.AuditContext, *, causation: str | None) -> None:
    """The row carries the web request's actor and correlation, and the expected cause."""
    assert row["actor"] == USER, row
    assert row["correlation_id"] == web.correlation_id, row
    assert row["request_id"] == web.request_id, row
    assert row["origin"] == "celery", row
    assert row["context_error"] is None, row
    assert row["causation_id"] == causation, row
    j = job(row)
    assert set(j) == {"name", "id", "retries", "parent_id", "root_id"}, row
    if causation != web.request_id:
        assert j["parent_id"] == causation, row


def chord_senders(env: Env, header_ids: set[str]) -> set[str]:
    """The tasks that may send a chord's callback (its cause).

    With a result backend that joins natively (Redis), the header task that completed the chord.
    Otherwise (the ``file://`` fallback), Celery's ``celery.chord_unlock`` task, which polls the
    result backend and sends the callback itself.
    """
    if env.app.backend.supports_native_join:
        return header_ids
    return set(re.findall(r"celery\.chord_unlock\[([0-9a-f-]+)\] received", env.worker.log()))


def assert_root_job(row: dict[str, Any], name: str, task_id: str) -> None:
    assert job(row) == {
        "name": tasks.NAME + name,
        "id": task_id,
        "retries": 0,
        "parent_id": None,
        "root_id": task_id,
    }


# -- publishing paths ------------------------------------------------------------------------------


def test_delay_apply_async_send_task_and_plain_tasks(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    results = {
        f"{p}-delay": tasks.record.delay(f"{p}-delay"),
        f"{p}-apply": tasks.record.apply_async((f"{p}-apply",), priority=3),
        f"{p}-send": env.app.send_task(tasks.NAME + "record", args=[f"{p}-send"]),
        f"{p}-plain": tasks.plain_record.delay(f"{p}-plain"),
    }
    rows = env.rows(p, 4)
    for label, result in results.items():
        assert_inherited(rows[label], web, causation=web.request_id)
        name = "plain_record" if label.endswith("plain") else "record"
        assert_root_job(rows[label], name, result.id)
    assert threadline.current() is web  # publishing never changes the caller's context


def test_countdown_and_eta(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    start = time.monotonic()
    a = tasks.record.apply_async((f"{p}-countdown",), countdown=1)
    b = tasks.record.apply_async((f"{p}-eta",), eta=datetime.now(timezone.utc) + timedelta(seconds=1))
    rows = env.rows(p, 2)
    assert time.monotonic() - start >= 0.9
    assert_inherited(rows[f"{p}-countdown"], web, causation=web.request_id)
    assert_inherited(rows[f"{p}-eta"], web, causation=web.request_id)
    assert_root_job(rows[f"{p}-countdown"], "record", a.id)
    assert_root_job(rows[f"{p}-eta"], "record", b.id)


def test_chain_each_step_caused_by_the_previous(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    result = chain(tasks.record.si(f"{p}-1"), tasks.record.si(f"{p}-2"), tasks.record.si(f"{p}-3")).delay()
    rows = env.rows(p, 3)
    first, second, third = rows[f"{p}-1"], rows[f"{p}-2"], rows[f"{p}-3"]
    assert_inherited(first, web, causation=web.request_id)
    assert_inherited(second, web, causation=job(first)["id"])
    assert_inherited(third, web, causation=job(second)["id"])
    assert job(third)["id"] == result.id
    assert {job(r)["root_id"] for r in rows.values()} == {job(first)["id"]}


def test_group(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    result = group(tasks.record.si(f"{p}-{i}") for i in range(3)).delay()
    rows = env.rows(p, 3)
    assert {job(r)["id"] for r in rows.values()} == {r.id for r in result.results}
    for row in rows.values():
        assert_inherited(row, web, causation=web.request_id)


def test_chord_header_and_callback(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    result = chord(
        [tasks.record.si(f"{p}-h{i}") for i in range(3)], tasks.record_many.s(label=f"{p}-callback")
    ).delay()
    assert result.get(timeout=30) == f"{p}-callback"
    rows = env.rows(p, 4)
    header_ids = {job(rows[f"{p}-h{i}"])["id"] for i in range(3)}
    for i in range(3):
        assert_inherited(rows[f"{p}-h{i}"], web, causation=web.request_id)
    callback = rows[f"{p}-callback"]
    assert callback["causation_id"] in chord_senders(env, header_ids), callback
    assert_inherited(callback, web, causation=callback["causation_id"])
    assert job(callback)["id"] == result.id


def test_chain_inside_chord(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    header = [chain(tasks.record.si(f"{p}-a1"), tasks.record.si(f"{p}-a2")), tasks.record.si(f"{p}-b")]
    result = chord(header, tasks.record_many.s(label=f"{p}-callback")).delay()
    assert result.get(timeout=30) == f"{p}-callback"
    rows = env.rows(p, 4)
    assert_inherited(rows[f"{p}-a1"], web, causation=web.request_id)
    assert_inherited(rows[f"{p}-a2"], web, causation=job(rows[f"{p}-a1"])["id"])
    assert_inherited(rows[f"{p}-b"], web, causation=web.request_id)
    callback = rows[f"{p}-callback"]
    senders = chord_senders(env, {job(rows[f"{p}-a2"])["id"], job(rows[f"{p}-b"])["id"]})
    assert callback["causation_id"] in senders, callback
    assert_inherited(callback, web, causation=callback["causation_id"])


def test_link_and_link_error(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    ok = tasks.record.apply_async((f"{p}-ok",), link=tasks.record.si(f"{p}-link"))
    bad = tasks.fail.apply_async((f"{p}-bad",), link_error=tasks.errback.s(label=f"{p}-errback"))
    rows = env.rows(p, 4)
    assert_inherited(rows[f"{p}-ok"], web, causation=web.request_id)
    assert_inherited(rows[f"{p}-link"], web, causation=ok.id)
    assert_inherited(rows[f"{p}-bad"], web, causation=web.request_id)
    if job(rows[f"{p}-errback"])["name"] == tasks.NAME + "errback":  # a task of its own
        assert_inherited(rows[f"{p}-errback"], web, causation=bad.id)
    else:  # called in the failed task (Celery before 5.5): its context, unchanged
        assert job(rows[f"{p}-errback"]) == job(rows[f"{p}-bad"])
        assert_inherited(rows[f"{p}-errback"], web, causation=web.request_id)


def test_failures_the_main_process_handles_send_their_errbacks_in_context(
    env: Env, web: threadline.AuditContext
) -> None:
    # A chord member that expires waiting for its countdown is revoked by the worker's main
    # process, which fails the chord and sends its error callback; a task over its hard time limit
    # (prefork) is failed there too, and its link_error errback sent (or called) from there.
    p = env.prefix()
    header = [tasks.record.si(f"{p}-member"), tasks.record.si(f"{p}-late").set(countdown=2, expires=1)]
    chord(header, tasks.record_many.s(label=f"{p}-body")).on_error(
        tasks.errback.s(label=f"{p}-chord-errback")
    ).delay()
    labels = [f"{p}-member", f"{p}-chord-errback"]
    if env.worker.pool == "prefork":
        tasks.overrun.apply_async((f"{p}-overrun",), link_error=tasks.errback.s(label=f"{p}-limit-errback"))
        labels += [f"{p}-overrun", f"{p}-limit-errback"]
    # (Celery 5.6 and later call a timed-out task's errbacks twice: count each label once)
    deadline = time.monotonic() + 60
    found = wait_row_list(env.dsn, p, len(labels), timeout=60, worker=env.worker)
    while {row["label"] for row in found} != set(labels) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = wait_row_list(env.dsn, p, len(labels), timeout=60, worker=env.worker)
    assert {row["label"] for row in found} == set(labels)
    for row in found:
        assert (row["actor"], row["correlation_id"], row["context_error"]) == (
            USER, web.correlation_id, None
        ), row  # fmt: skip


def test_main_process_failures_of_tasks_on_a_base_of_their_own_keep_the_context(
    env: Env, web: threadline.AuditContext
) -> None:
    # The same failures, of plain Celery tasks whose base class is the application's own.
    p = env.prefix()
    late = tasks.own_base_record.si(f"{p}-late").set(countdown=2, expires=1)
    chord([tasks.record.si(f"{p}-member"), late], tasks.record_many.s(label=f"{p}-body")).on_error(
        tasks.errback.s(label=f"{p}-chord-errback")
    ).delay()
    labels = {f"{p}-member", f"{p}-chord-errback"}
    if env.worker.pool == "prefork":
        tasks.own_base_overrun.apply_async(
            (f"{p}-overrun",), link_error=tasks.errback.s(label=f"{p}-limit-errback")
        )
        labels |= {f"{p}-overrun", f"{p}-limit-errback"}
    found = wait_row_list(env.dsn, p, len(labels), timeout=60, worker=env.worker)
    deadline = time.monotonic() + 60
    while {row["label"] for row in found} != labels and time.monotonic() < deadline:
        time.sleep(0.2)
        found = wait_row_list(env.dsn, p, len(labels), timeout=60, worker=env.worker)
    assert {row["label"] for row in found} == labels
    for row in found:
        assert (row["actor"], row["correlation_id"], row["context_error"]) == (
            USER, web.correlation_id, None
        ), row  # fmt: skip


@pytest.mark.parametrize("name", ["flaky", "auto_flaky"])
def test_retries_keep_context_and_cause(env: Env, web: threadline.AuditContext, name: str) -> None:
    p = env.prefix()
    task = getattr(tasks, name)
    result = task.delay(p, 2)
    assert result.get(timeout=30) == p
    rows = env.rows(p, 3)
    for attempt in range(3):
        row = rows[f"{p}:try{attempt}"]
        assert row["actor"] == USER and row["correlation_id"] == web.correlation_id, row
        assert row["causation_id"] == web.request_id, row  # a retry is not its own cause
        assert row["origin"] == "celery" and row["context_error"] is None, row
        assert job(row)["id"] == result.id and job(row)["retries"] == attempt, row
        assert job(row)["root_id"] == result.id, row


def _task_runs(dsn: str, task_ids: set[str], count: int) -> list[dict[str, Any]]:
    """Poll until the worker has recorded ``count`` runs of these tasks (written in the background)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        while True:
            rows = cur.execute(
                "SELECT * FROM threadline.task_runs WHERE task_id = ANY (%s) ORDER BY ended_at, id",
                [list(task_ids)],
            ).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def test_trace_names_every_task_and_gives_each_attempt_its_outcome(
    env: Env, web: threadline.AuditContext
) -> None:
    p = env.prefix()
    quiet = tasks.show_context.delay(p)  # writes nothing
    retried = tasks.flaky.delay(p + ":flaky", 2)  # writes on each attempt, succeeds on the third
    failing = tasks.fail.delay(p + ":fail")  # writes, then fails
    gave_up = tasks.give_up.delay(p)  # writes nothing, retried twice, then fails
    assert quiet.get(timeout=30)["correlation_id"] == web.correlation_id
    assert retried.get(timeout=30) == p + ":flaky"
    for result in (failing, gave_up):
        result.get(timeout=30, propagate=False)
        assert result.failed()
    ids = {quiet.id, retried.id, failing.id, gave_up.id}
    runs = _task_runs(env.dsn, ids, 8)
    assert len(runs) == 8, runs
    assert all(r["correlation_id"] == web.correlation_id and r["actor"] == USER for r in runs)
    assert all(r["causation_id"] == web.request_id and r["worker"] for r in runs)
    assert all(r["started_at"] <= r["ended_at"] for r in runs)
    with psycopg.connect(env.dsn) as conn:
        trace = threadline.trace(conn, web.correlation_id or "")
    nodes = {n.id: n for n in trace.walk() if n.kind == "task"}
    assert set(nodes) >= ids
    assert all(nodes[i].name for i in ids)
    assert nodes[quiet.id].name == tasks.NAME + "show_context" and not nodes[quiet.id].transactions
    assert [(r.attempt, r.outcome) for r in nodes[quiet.id].runs] == [(0, "succeeded")]
    assert [(r.attempt, r.outcome) for r in nodes[retried.id].runs] == [
        (0, "retried"),
        (1, "retried"),
        (2, "succeeded"),
    ]
    assert nodes[failing.id].outcome == "failed"
    assert nodes[failing.id].runs[-1].error == "RuntimeError: fails on purpose"
    assert [(r.attempt, r.outcome) for r in nodes[gave_up.id].runs] == [
        (0, "retried"),
        (1, "retried"),
        (2, "failed"),
    ]
    assert nodes[gave_up.id].runs[0].error == f"LookupError: {p} is not there yet"
    assert not nodes[gave_up.id].transactions
    text = trace.render()
    assert f"task {tasks.NAME}give_up [{gave_up.id}]  failed  3 attempts  (no audited writes)" in text
    assert "attempt 3 failed" in text and "(unknown name)" not in text


def test_a_retry_count_out_of_range_never_holds_up_the_task_runs(env: Env) -> None:
    # A message may say any retry count: one over the column's range is recorded at its bound,
    # and the runs recorded after it are written too.
    p = env.prefix()
    counts = {"wrapped": 2**40, "negative": -(2**40)}  # the low 32 bits would read 0
    if not env.worker.broker.startswith("amqp"):  # AMQP tables carry 64-bit integers at most
        counts["huge"] = 10**30
    ids = {
        env.worker.publish_raw(tasks.NAME + "record", [f"{p}-{name}"], retries=count): name
        for name, count in counts.items()
    }
    after = env.worker.publish_raw(tasks.NAME + "record", [f"{p}-after"])
    env.rows(p, len(ids) + 1)
    runs = _task_runs(env.dsn, {*ids, after}, len(ids) + 1)
    assert {ids.get(r["task_id"], "after"): (r["attempt"], r["outcome"]) for r in runs} == {
        **{name: (2**31 - 1 if count > 0 else -(2**31), "succeeded") for name, count in counts.items()},
        "after": (0, "succeeded"),
    }


def test_child_task_enqueued_inside_a_task(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    parent = tasks.spawn.delay(p)
    rows = env.rows(p, 2)
    assert_inherited(rows[p], web, causation=web.request_id)
    child = rows[f"{p}:child"]
    assert_inherited(child, web, causation=parent.id)
    assert job(child)["parent_id"] == parent.id and job(child)["root_id"] == parent.id


def test_replace_and_replace_inside_a_chain(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    alone = tasks.replacer.delay(f"{p}-alone")
    in_chain = chain(tasks.replacer.si(f"{p}-chained"), tasks.record.si(f"{p}-after")).delay()
    rows = env.rows(p, 5)
    assert_inherited(rows[f"{p}-alone"], web, causation=web.request_id)
    replacement = rows[f"{p}-alone:replacement"]
    assert_inherited(replacement, web, causation=web.request_id)  # the replacement is the same task
    assert job(replacement)["id"] == alone.id
    chained = rows[f"{p}-chained"]
    assert_inherited(chained, web, causation=web.request_id)
    assert_inherited(rows[f"{p}-chained:replacement"], web, causation=web.request_id)
    assert job(rows[f"{p}-chained:replacement"])["id"] == job(chained)["id"]
    after = rows[f"{p}-after"]
    assert_inherited(after, web, causation=job(chained)["id"])
    assert job(after)["id"] == in_chain.id


# -- no incoming context ---------------------------------------------------------------------------


def test_beat_style_roots(env: Env) -> None:
    """Roots published with no context at all (a real beat process: test_celery_solo.py)."""
    p = env.prefix()
    assert threadline.current().is_empty
    plain = tasks.record.delay(f"{p}-root")
    tick = env.worker.publish_raw(tasks.NAME + "beat_tick", [f"{p}-tick"])  # a producer without threadline
    # a header that names neither an actor nor a story (only meta): no incoming context either
    metaonly = env.worker.publish_raw(
        tasks.NAME + "record", [f"{p}-meta"], {"threadline": {"v": 1, "meta": {"k": 1}}}
    )
    rows = env.rows(p, 4)
    meta = rows[f"{p}-meta"]
    assert (meta["actor"], meta["correlation_id"], meta["context_error"]) == (DEFAULT, metaonly, None)
    root = rows[f"{p}-root"]
    assert (root["actor"], root["correlation_id"], root["causation_id"], root["origin"]) == (
        DEFAULT,
        plain.id,
        None,
        "celery",
    )
    assert root["context_error"] is None
    ticked = rows[f"{p}-tick"]
    assert ticked["actor"] == tasks.BEAT_ACTOR.to_dict()  # the task's own default actor wins
    assert (ticked["correlation_id"], ticked["causation_id"]) == (tick, None)
    child = rows[f"{p}-tick:child"]
    assert child["actor"] == tasks.BEAT_ACTOR.to_dict()
    assert (child["correlation_id"], child["causation_id"]) == (tick, tick)  # one story per beat run


def test_no_leak_between_tasks_in_the_same_process_and_thread(env: Env, web: threadline.AuditContext) -> None:
    p = env.prefix()
    for i in range(6):
        tasks.record.delay(f"{p}-ctx{i}")
    env.rows(f"{p}-ctx", 6)
    bare = [env.worker.publish_raw(tasks.NAME + "record", [f"{p}-bare{i}"]) for i in range(6)]
    rows = env.rows(p, 12)
    carriers = {(r["pid"], r["thread"]) for label, r in rows.items() if "-ctx" in label}
    shared = 0
    for i, task_id in enumerate(bare):
        row = rows[f"{p}-bare{i}"]
        assert row["actor"] == DEFAULT, row  # never user:7 left over from an earlier task
        assert (row["correlation_id"], row["request_id"], row["causation_id"]) == (task_id, None, None), row
        shared += (row["pid"], row["thread"]) in carriers
    assert shared, "no header-less task ran where a context-carrying one had run: the test proves nothing"
    assert "context left behind" not in env.worker.log()  # reset with its token after every task


# -- malformed incoming headers ------------------------------------------------------------------


BAD_HEADERS: dict[str, Any] = {
    "not-json": "{not json",
    "list": [1, 2],
    "number": 5,
    "wrong-types": {"v": 1, "actor": 42, "correlation_id": ["x"]},
    "bad-actor": {"v": 1, "actor": {"type": "User!", "id": "1"}},
    "unknown-version": {"v": 99, "actor": {"type": "admin", "id": "1"}},
    "unknown-field": {"v": 1, "actor": {"type": "admin", "id": "1"}, "role": "root"},
    "publisher-error": {"v": 1, "error": "context too large"},
    "huge": {"v": 1, "actor": {"type": "admin", "id": "1"}, "meta": {"x": "y" * 100_000}},
    "lone-surrogate": '{"v":1,"actor":{"type":"admin","id":"1"},"correlation_id":"x\\ud800"}',
    "surrogate-in-meta": '{"v":1,"actor":{"type":"admin","id":"1"},"meta":{"k":"\\udc00"}}',
    "bidi-override": {"v": 1, "actor": {"type": "admin", "id": "1"}, "request_id": "abc\u202edef"},
    "c1-control": {"v": 1, "actor": {"type": "admin", "id": "1\x85"}},
    "sender-sets-incoming-error": {"v": 1, "actor": {"type": "admin", "id": "1"}, "incoming_error": "forged"},
}


def test_a_failing_task_with_a_malformed_header_is_reported_once(env: Env) -> None:
    p = env.prefix()
    task_id = env.worker.publish_raw(tasks.NAME + "fail", [f"{p}-fail"], {"threadline": "{not json"})
    env.rows(p, 1)
    env.app.AsyncResult(task_id).get(timeout=30, propagate=False)
    time.sleep(1)  # the worker's main process handles the failure after the result is stored
    warnings = [
        line
        for line in env.worker.log().splitlines()
        if task_id in line and "invalid incoming audit context" in line
    ]
    assert len(warnings) == 1, warnings


def test_malformed_headers_never_crash_and_mark_the_transaction(env: Env) -> None:
    p = env.prefix()
    bad = dict(BAD_HEADERS)
    if not env.worker.broker.startswith("amqp"):
        bad["one-megabyte"] = "x" * 1_000_000  # RabbitMQ refuses header frames that large
    ids = {
        name: env.worker.publish_raw(tasks.NAME + "record", [f"{p}-{name}"], {"threadline": value})
        for name, value in bad.items()
    }
    rows = env.rows(p, len(bad))
    log = env.worker.log()
    for name, task_id in ids.items():
        row = rows[f"{p}-{name}"]
        assert row["actor"] is None, row  # never a wrong actor, not even the default one
        assert row["context_error"].startswith("incoming: "), row
        assert (row["correlation_id"], row["origin"], job(row)["id"]) == (task_id, "celery", task_id), row
        warnings = [
            line for line in log.splitlines() if task_id in line and "invalid incoming audit context" in line
        ]
        assert len(warnings) == 1, (name, warnings)
    assert rows[f"{p}-not-json"]["context_error"] == "incoming: header is not valid JSON"
    assert "unsupported version 99" in rows[f"{p}-unknown-version"]["context_error"]
    assert "not encoded by its publisher" in rows[f"{p}-publisher-error"]["context_error"]
    assert "bytes; the limit is" in rows[f"{p}-huge"]["context_error"]
    # a task that retries after its header was refused: every attempt says why
    retried = env.worker.publish_raw(tasks.NAME + "flaky", [f"{p}-retry", 1], {"threadline": "{not json"})
    attempts = env.rows(f"{p}-retry", 2)
    assert [
        (attempts[f"{p}-retry:try{i}"]["actor"], attempts[f"{p}-retry:try{i}"]["context_error"])
        for i in (0, 1)
    ] == [(None, "incoming: header is not valid JSON")] * 2
    assert attempts[f"{p}-retry:try1"]["correlation_id"] == retried
    # the worker is still healthy and later tasks are unaffected
    with threadline.context(actor="user:8", correlation_id=f"after-{p}"):
        tasks.record.delay(f"{p}-after")
    after = env.rows(f"{p}-after", 1)[f"{p}-after"]
    assert (after["actor"], after["context_error"]) == ({"type": "user", "id": "8"}, None)
