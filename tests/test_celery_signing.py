"""Signed contexts: a worker with signing keys; forged headers published straight to the broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import threadline
from threadline import ActorRef, UntrustedContext
from threadline.core import codec
from threadline.propagation import carrier

from .celery_app import tasks
from .celery_app.harness import Worker, env_var, setup_events_table, wait_row_list, wait_rows

NEW_KEY = "new-signing-key-0123456789abcdef"
OLD_KEY = "old-signing-key-0123456789abcdef"
OTHER_KEY = "someone-elses-key-0123456789abcd"
USER = {"type": "user", "id": "7"}


@pytest.fixture(scope="module")
def celery_dsn(database: str) -> Iterator[str]:
    setup_events_table(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture(scope="module", params=[("redis", "prefork"), ("amqp", "threads")], ids=lambda p: "-".join(p))
def signed(
    request: pytest.FixtureRequest, celery_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    broker, pool = request.param
    worker = Worker(
        broker, pool, celery_dsn, Path(tmp_path_factory.mktemp("celery")), signing_keys=[NEW_KEY, OLD_KEY]
    )
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


_clients: list[Celery] = []


def client(worker: Worker, keys: list[str] | None) -> Celery:
    """A producer app for the worker's queue, with these keys (uninstalled after the test)."""
    app = worker.app(signing_keys=keys)
    app.set_current()
    _clients.append(app)
    return app


@pytest.fixture(autouse=True)
def _uninstall_clients() -> Iterator[None]:
    yield
    while _clients:
        threadline.celery.uninstall(_clients.pop())


def forged(
    body: dict[str, Any],
    key: str | None,
    task_id: str | None = None,
    expires: int | None = None,
    task: str = tasks.NAME + "record",
) -> dict[str, Any]:
    """A header as an attacker (or a producer holding ``key``) would build it: bound to
    ``task_id`` and ``task`` (and expiring at ``expires``, default in an hour) when an id is given."""
    out = dict(body)
    if task_id is not None:
        out["msg"] = carrier.binding(f"{task_id}\x1f{task}")
        out["exp"] = int(time.time()) + 3600 if expires is None else expires
    if key is not None:
        out["sig"] = codec.sign(codec.dumps(out), key.encode())
    return out


ADMIN = {"v": 1, "actor": {"type": "admin", "id": "1"}, "correlation_id": "forged"}


def test_signed_contexts_are_accepted_and_resigned_for_children(signed: Worker, celery_dsn: str) -> None:
    client(signed, [NEW_KEY, OLD_KEY])
    p = f"signed-{uuid.uuid4().hex[:8]}"
    with threadline.context(actor=ActorRef.user("7"), correlation_id=p, request_id=f"req-{p}"):
        parent = tasks.spawn.delay(f"{p}-spawn")
        guarded = tasks.guarded.delay(f"{p}-guarded")
    rows = wait_rows(celery_dsn, p, 3, worker=signed)
    for row in rows.values():
        assert (row["actor"], row["correlation_id"], row["context_error"]) == (USER, p, None), row
    assert rows[f"{p}-spawn:child"]["causation_id"] == parent.id
    assert guarded.get(timeout=30) == f"{p}-guarded"


def test_key_rotation_old_key_still_verifies(signed: Worker, celery_dsn: str) -> None:
    client(signed, [OLD_KEY])  # a producer not yet rolled over
    p = f"rotation-{uuid.uuid4().hex[:8]}"
    with threadline.context(actor=ActorRef.user("7"), correlation_id=p):
        tasks.record.delay(f"{p}-celery")
    task_id = str(uuid.uuid4())
    signed.publish_raw(
        tasks.NAME + "record",
        [f"{p}-kombu"],
        {"threadline": forged({**ADMIN, "correlation_id": p}, OLD_KEY, task_id)},
        task_id=task_id,
    )
    rows = wait_rows(celery_dsn, p, 2, worker=signed)
    assert rows[f"{p}-celery"]["actor"] == USER and rows[f"{p}-celery"]["context_error"] is None
    assert rows[f"{p}-kombu"]["actor"] == ADMIN["actor"] and rows[f"{p}-kombu"]["context_error"] is None


def test_forged_headers_are_stripped_marked_and_logged(signed: Worker, celery_dsn: str) -> None:
    client(signed, [NEW_KEY])
    p = f"forged-{uuid.uuid4().hex[:8]}"
    good = forged(ADMIN, NEW_KEY)
    headers = {
        "unsigned": ADMIN,
        "other-key": forged(ADMIN, OTHER_KEY),
        "tampered": {**good, "actor": {"type": "admin", "id": "2"}},
        "bad-sig-type": {**ADMIN, "sig": 12345},
    }
    ids = {
        name: signed.publish_raw(tasks.NAME + "record", [f"{p}-{name}"], {"threadline": h})
        for name, h in headers.items()
    }
    rows = wait_rows(celery_dsn, p, len(headers), worker=signed)
    log = signed.log()
    for name, task_id in ids.items():
        row = rows[f"{p}-{name}"]
        assert row["actor"] is None, row  # never the forged admin
        assert row["correlation_id"] == task_id, row  # nor its correlation id
        assert row["context_error"].startswith("incoming: header "), row
        assert (
            sum(task_id in line and "invalid incoming audit context" in line for line in log.splitlines())
            == 1
        )
    assert rows[f"{p}-unsigned"]["context_error"] == "incoming: header is not signed"
    assert "matches none of the signing keys" in rows[f"{p}-tampered"]["context_error"]


def test_unsigned_producer_is_stripped(signed: Worker, celery_dsn: str) -> None:
    client(signed, None)  # a producer installed without the keys
    p = f"nokeys-{uuid.uuid4().hex[:8]}"
    with threadline.context(actor=ActorRef.user("7"), correlation_id=p):
        tasks.record.delay(p)
    row = wait_rows(celery_dsn, p, 1, worker=signed)[p]
    assert (row["actor"], row["context_error"]) == (None, "incoming: header is not signed")


def test_reject_policy_fails_the_task_without_running_it(signed: Worker, celery_dsn: str) -> None:
    app = client(signed, [NEW_KEY])
    p = f"reject-{uuid.uuid4().hex[:8]}"
    rejected = signed.publish_raw(tasks.NAME + "guarded", [f"{p}-forged"], {"threadline": ADMIN})
    no_header = signed.publish_raw(tasks.NAME + "guarded", [f"{p}-beat"])  # no context is not a forgery
    result = app.AsyncResult(rejected)
    with pytest.raises(UntrustedContext) as info:
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert "was not run: header is not signed" in str(info.value)
    assert "signature policy 'reject'" in str(info.value)
    assert app.AsyncResult(no_header).get(timeout=30) == f"{p}-beat"
    rows = wait_rows(celery_dsn, p, 1, worker=signed, settle=0.3)
    assert set(rows) == {f"{p}-beat"}  # the rejected body never wrote
    assert rows[f"{p}-beat"]["actor"] == tasks.DEFAULT_ACTOR.to_dict()
    assert any(rejected in line and "refused" in line for line in signed.log().splitlines())


def test_celery_ids_without_a_signed_header_join_no_story(signed: Worker, celery_dsn: str) -> None:
    # A producer without a key sends no header, but Celery's own ids naming another story.
    app = client(signed, [NEW_KEY])
    p = f"claim-{uuid.uuid4().hex[:8]}"
    claim = {"root_id": "victim-corr", "parent_id": "victim-req"}
    claimed = signed.publish_raw(tasks.NAME + "record", [f"{p}-claim"], claim)
    refused = signed.publish_raw(tasks.NAME + "guarded", [f"{p}-guarded"], claim)
    with pytest.raises(UntrustedContext, match="no signed header"):
        app.AsyncResult(refused).get(timeout=30)  # under "reject", not run
    rows = wait_rows(celery_dsn, p, 1, worker=signed, settle=0.3)
    row = rows[f"{p}-claim"]
    assert (row["actor"], row["correlation_id"], row["causation_id"]) == (None, claimed, None)
    assert row["context_error"].startswith("incoming: no signed header, yet its Celery ids name another task")
    assert (row["job"]["root_id"], row["job"]["parent_id"]) == (claimed, None)
    assert set(rows) == {f"{p}-claim"}


def test_celery_ids_beside_an_untrusted_header_join_no_story_nor_do_their_retries(
    signed: Worker, celery_dsn: str
) -> None:
    # The same claim with a header the worker refuses, and tasks that retry after such a start:
    # every attempt stays out of the claimed story.
    client(signed, [NEW_KEY])
    p = f"claim-{uuid.uuid4().hex[:8]}"
    claim = {"root_id": "victim-corr", "parent_id": "victim-req"}
    unsigned = {"threadline": json.dumps(ADMIN)}
    ids = {
        f"{p}-junk": signed.publish_raw(
            tasks.NAME + "record", [f"{p}-junk"], {**claim, "threadline": "junk"}
        ),
        f"{p}-unsigned": signed.publish_raw(tasks.NAME + "record", [f"{p}-unsigned"], {**claim, **unsigned}),
        f"{p}-wrong-key": signed.publish_raw(
            tasks.NAME + "record", [f"{p}-wrong-key"], {**claim, "threadline": forged(ADMIN, OTHER_KEY)}
        ),
    }
    for name, headers in (("no-header", claim), ("unsigned-retry", {**claim, **unsigned})):
        task_id = signed.publish_raw(tasks.NAME + "flaky", [f"{p}-{name}", 1], headers)
        ids.update({f"{p}-{name}:try0": task_id, f"{p}-{name}:try1": task_id})
    rows = wait_rows(celery_dsn, p, len(ids), worker=signed)
    assert set(rows) == set(ids)
    for label, row in rows.items():
        task_id = ids[label]
        assert (row["actor"], row["correlation_id"], row["causation_id"]) == (None, task_id, None), row
        assert (row["job"]["root_id"], row["job"]["parent_id"]) == (task_id, None), row
        assert row["context_error"].startswith("incoming: "), row


def test_a_signed_header_is_bound_to_its_message_and_expires(signed: Worker, celery_dsn: str) -> None:
    client(signed, [NEW_KEY])
    p = f"replay-{uuid.uuid4().hex[:8]}"
    original = str(uuid.uuid4())
    good = forged({**ADMIN, "correlation_id": p}, NEW_KEY, original)
    cases = {
        "original": (good, original),  # on its own message: trusted
        "copied": (good, None),  # the same header on another message: a replay
        "unbound": (forged({**ADMIN, "correlation_id": p}, NEW_KEY), None),  # old-style: no binding
        "expired": (forged({**ADMIN, "correlation_id": p}, NEW_KEY, "x", expires=int(time.time()) - 5), "x"),
        "rebound": ({**good, "msg": carrier.binding("other")}, None),  # binding edited: signature breaks
        # the same task id, but another task: the binding names the task too
        "other-task": (
            forged({**ADMIN, "correlation_id": p}, NEW_KEY, "y", task=tasks.NAME + "guarded"),
            "y",
        ),
    }
    ids = {
        name: signed.publish_raw(tasks.NAME + "record", [f"{p}-{name}"], {"threadline": h}, task_id=tid)
        for name, (h, tid) in cases.items()
    }
    rows = wait_rows(celery_dsn, p, len(cases), worker=signed)
    assert rows[f"{p}-original"]["actor"] == ADMIN["actor"] and rows[f"{p}-original"]["context_error"] is None
    for name in ("copied", "unbound", "expired", "rebound", "other-task"):
        row = rows[f"{p}-{name}"]
        assert row["actor"] is None and row["correlation_id"] == ids[name], (name, row)
    assert "bound to another message" in rows[f"{p}-copied"]["context_error"]
    assert "not bound to its message" in rows[f"{p}-unbound"]["context_error"]
    assert "expired" in rows[f"{p}-expired"]["context_error"]
    assert "matches none of the signing keys" in rows[f"{p}-rebound"]["context_error"]
    assert "bound to another message" in rows[f"{p}-other-task"]["context_error"]


def test_binding_in_the_generic_carrier() -> None:
    ctx = threadline.AuditContext(actor=ActorRef.user("7"), correlation_id="c")
    bound = threadline.inject({}, ctx, signing_key=NEW_KEY, message_id="m-1")
    assert threadline.extract(bound, signing_keys=[NEW_KEY], message_id="m-1") == ctx
    with pytest.raises(UntrustedContext, match="bound to another message"):
        threadline.extract(bound, signing_keys=[NEW_KEY], message_id="m-2")
    with pytest.raises(UntrustedContext, match="bound to another message"):
        threadline.extract(bound, signing_keys=[NEW_KEY])  # the receiver must say which message
    unbound = threadline.inject({}, ctx, signing_key=NEW_KEY)
    assert threadline.extract(unbound, signing_keys=[NEW_KEY]) == ctx  # opted out of binding
    with pytest.raises(UntrustedContext, match="not bound"):
        threadline.extract(unbound, signing_keys=[NEW_KEY], message_id="m-1")
    short = threadline.inject({}, ctx, signing_key=NEW_KEY, message_id="m-1", ttl=-1)
    with pytest.raises(UntrustedContext, match="expired"):
        threadline.extract(short, signing_keys=[NEW_KEY], message_id="m-1")


def test_a_header_due_later_expires_counting_from_when_it_is_due() -> None:
    app = Celery("eta", set_as_current=False)
    threadline.celery.install(app, signing_keys=[NEW_KEY], signature_ttl=60)
    try:
        inst = threadline.propagation.celery._installations[app]
        ctx = threadline.AuditContext(actor=ActorRef.user("7"))
        later = datetime.now(timezone.utc) + timedelta(hours=2)
        header = inst.header_for(ctx, "t-1", None, "app.task", later.isoformat())
        assert json.loads(header)["exp"] >= int(later.timestamp()) + 60
        subject = threadline.propagation.celery.binding_subject("t-1", "app.task")
        assert carrier.decode_wire(header, keys=(NEW_KEY.encode(),), message_id=subject)[
            "actor"
        ] == ActorRef.user("7")
    finally:
        threadline.celery.uninstall(app)


def test_unbound_signatures_are_accepted_only_when_asked_for() -> None:
    unbound = threadline.inject({}, threadline.AuditContext(actor=ActorRef.user("7")), signing_key=NEW_KEY)
    keys = (NEW_KEY.encode(),)
    with pytest.raises(UntrustedContext, match="not bound"):
        carrier.decode_wire(unbound["threadline"], keys=keys, message_id="t\x1fx")
    fields = carrier.decode_wire(unbound["threadline"], keys=keys, message_id="t\x1fx", require_binding=False)
    assert fields["actor"] == ActorRef.user("7")


def test_a_beat_entry_signed_with_the_key_is_bound_to_each_message(
    signed: Worker, celery_dsn: str, tmp_path: Path
) -> None:
    # A beat entry's header is signed once, bound to no message; beat, installed with the key,
    # binds it to each task it sends. A header signed with another key is still refused.
    nightly = threadline.AuditContext(actor=ActorRef.system("nightly"), correlation_id="nightly-run")
    runs = {
        "ours": threadline.inject({}, nightly, signing_key=NEW_KEY),
        "theirs": threadline.inject({}, nightly, signing_key=OTHER_KEY),
    }
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, headers in runs.items():
        label = f"beat-{name}-{uuid.uuid4().hex[:8]}"
        beat = signed.start_beat(label, tmp_path, headers)
        try:
            found = wait_row_list(celery_dsn, label, 2, worker=signed)
        finally:
            Worker.stop_process(beat)
        rows[name] = [r for r in found if r["label"] == label]
    for tick in rows["ours"]:
        assert (tick["actor"], tick["correlation_id"], tick["context_error"]) == (
            {"type": "system", "id": "nightly"},
            "nightly-run",
            None,
        ), tick
    for tick in rows["theirs"]:
        assert tick["actor"] is None, tick
        assert "matches none of the signing keys" in tick["context_error"], tick
