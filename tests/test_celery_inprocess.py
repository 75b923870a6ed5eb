"""Celery propagation in one process: eager mode, install/uninstall, the caller-side encoding check,
the header codec, signing, and inject/extract for other transports."""

from __future__ import annotations

import json
import logging
import pickle
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, signals
from celery import Task as CeleryTask
from kombu import Connection
from kombu.utils.imports import symbol_by_name

import threadline
from threadline import (
    ActorRef,
    AuditContext,
    ConfigurationError,
    InvalidActor,
    InvalidContext,
    UntrustedContext,
)
from threadline.core import codec
from threadline.propagation import carrier, celery_request
from threadline.propagation import celery as tc

from .celery_app import tasks
from .celery_app.harness import env_var, setup_events_table, wait_rows

KEY = "a-signing-key-of-32-characters!!"


@pytest.fixture(scope="module")
def celery_dsn(database: str) -> Iterator[str]:
    setup_events_table(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture
def eager(celery_dsn: str) -> Iterator[Celery]:
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    threadline.celery.install(app, default_actor=ActorRef.system("celery"))
    app.set_current()
    yield app
    threadline.celery.uninstall(app)


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    """An app on kombu's in-memory transport: publishes for real, in this process."""
    app = Celery("mem", broker=f"memory://localhost/{uuid.uuid4().hex}", set_as_current=False)
    app.conf.task_default_queue = f"q-{uuid.uuid4().hex[:8]}"
    threadline.celery.install(app)
    app.set_current()
    yield app
    threadline.celery.uninstall(app)


def web() -> threadline.context:
    return threadline.context(
        actor=ActorRef.user("7"), correlation_id="corr-eager", request_id="req-eager", origin="web"
    )


def published_headers(app: Celery) -> dict[str, Any]:
    with Connection(app.conf.broker_url) as conn:
        message = conn.SimpleQueue(app.conf.task_default_queue).get(timeout=0.5)
        message.ack()
        return dict(message.headers)


# -- eager mode ------------------------------------------------------------------------------------


def test_always_eager_keeps_the_callers_context_untouched(eager: Celery, celery_dsn: str) -> None:
    p = f"eager-{uuid.uuid4().hex[:8]}"
    with web() as caller:
        seen = tasks.record.delay(f"{p}-delay").get()
        tasks.spawn.delay(f"{p}-spawn")
        chain(tasks.record.si(f"{p}-c1"), tasks.record.si(f"{p}-c2")).delay()
        assert threadline.current() is caller  # never wiped, never replaced
    assert threadline.current().is_empty
    assert seen == caller.to_dict()
    rows = wait_rows(celery_dsn, p, 5, timeout=2)
    for row in rows.values():
        assert (row["actor"], row["correlation_id"], row["origin"]) == (
            {"type": "user", "id": "7"},
            "corr-eager",
            "web",
        )


def test_task_apply_without_header_keeps_context_and_with_header_restores_it(eager: Celery) -> None:
    with web() as caller:
        assert tasks.show_context.apply(("x",)).get() == caller.to_dict()
        header = eager.tasks[tasks.NAME + "show_context"]  # any task will do
        sent = AuditContext(actor=ActorRef.user("9"), correlation_id="from-header", request_id="r9")
        restored = header.apply(
            ("x",), headers=threadline.inject({}, sent)
        ).get()  # JSON text is accepted too
        assert threadline.current() is caller  # reset with the token, not wiped
    assert restored["actor"] == {"type": "user", "id": "9"}
    assert (restored["correlation_id"], restored["causation_id"], restored["origin"]) == (
        "from-header",
        "r9",
        "celery",
    )
    assert restored["job"]["name"] == tasks.NAME + "show_context"
    with threadline.context(actor="user:1"):
        bad = tasks.show_context.apply(("x",), headers={"threadline": "garbage"}).get()
        assert threadline.current().actor == ActorRef.user("1")
    assert "actor" not in bad and bad["incoming_error"] == "header is not valid JSON"


def test_eager_failure_restores_the_context(eager: Celery) -> None:
    with web() as caller:
        with pytest.raises(RuntimeError):
            tasks.fail.apply(("eager-fail-never-written",), headers={"threadline": {"v": 1}}, throw=True)
        assert threadline.current() is caller


def test_eager_without_any_context(eager: Celery) -> None:
    assert tasks.show_context.delay("x").get() == {"v": 1}
    assert threadline.current().is_empty


def test_nested_eager_runs_unwind_in_order_and_a_rejection_stays_with_its_task() -> None:
    app = Celery("nested", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    threadline.celery.install(app, signing_keys=[KEY], signature_policy="reject")
    seen: dict[str, Any] = {}

    @threadline.task(app=app, name="nested.inner")
    def inner(label: str) -> None:
        seen[label] = threadline.current()

    @threadline.task(app=app, name="nested.outer", bind=True)
    def outer(self: CeleryTask, signed: dict[str, str], unsigned: dict[str, str]) -> None:
        seen["outer"] = threadline.current()
        inner.apply(("inner",), headers=signed, task_id="inner-1")
        seen["after inner"] = threadline.current()
        inner.apply(("same id",), task_id=self.request.id)  # no header, the same id (as an eager retry)
        seen["after same id"] = threadline.current()
        with pytest.raises(UntrustedContext, match="not signed"):
            inner.apply(("forged",), headers=unsigned)
        seen["after forged"] = threadline.current()
        inner.apply(("next",), headers=signed, task_id="inner-1")  # the refusal was for that run only

    outer_ctx = AuditContext(actor=ActorRef.user("1"), correlation_id="outer")
    inner_ctx = AuditContext(actor=ActorRef.user("2"), correlation_id="inner")
    # bound to the task id and name it runs under
    signed = threadline.inject({}, inner_ctx, signing_key=KEY, message_id="inner-1\x1fnested.inner")
    try:
        with web() as caller:
            outer.apply(
                (signed, threadline.inject({}, inner_ctx)),
                headers=threadline.inject(
                    {}, outer_ctx, signing_key=KEY, message_id="outer-1\x1fnested.outer"
                ),
                task_id="outer-1",
            )
            assert threadline.current() is caller
        assert seen["outer"].actor == ActorRef.user("1") and seen["outer"].origin == "celery"
        assert seen["inner"].actor == ActorRef.user("2") and seen["next"].actor == ActorRef.user("2")
        for step in ("same id", "after inner", "after same id", "after forged"):
            assert seen[step] is seen["outer"], step
        assert "forged" not in seen  # its body never ran
        assert threadline.current().is_empty
    finally:
        threadline.celery.uninstall(app)


# -- install / uninstall / @threadline.task --------------------------------------------------------


def _receivers(app: Celery) -> int:
    inst = tc._installations.get(app)
    uids = (
        {tc._uid(s, inst) for s in (signals.before_task_publish, signals.task_prerun, signals.task_postrun)}
        if inst
        else set()
    )
    count = 0
    for signal in (signals.before_task_publish, signals.task_prerun, signals.task_postrun):
        count += sum(1 for (lookup, _), *_ in signal.receivers if lookup in uids)
    return count


def test_install_is_idempotent_and_uninstall_undoes_exactly_it() -> None:
    app = Celery("idem", broker="memory://", set_as_current=False)
    before = [
        len(s.receivers) for s in (signals.before_task_publish, signals.task_prerun, signals.task_postrun)
    ]
    original = app.send_task
    assert threadline.celery.install(app) is app
    threadline.celery.install(app)
    threadline.celery.install(app, default_actor="system:x", max_header_bytes=512)  # updates options only
    assert _receivers(app) == 3
    assert tc._installations[app].default_actor == ActorRef.system("x")
    assert threadline.celery.installed(app) and "send_task" in app.__dict__
    ours = app.send_task
    app.send_task = lambda *a, **kw: ours(*a, **kw)  # someone else wraps it after us
    with threadline.context(actor="user:1", meta={"x": "y" * 1000}):  # does not fit 512 bytes
        with pytest.raises(InvalidContext):
            app.send_task("t")
        assert threadline.celery.uninstall(app) is True
        assert app.send_task("t").id  # passes straight through to Celery: nothing checked any more
    del app.send_task
    assert threadline.celery.uninstall(app) is False
    assert not threadline.celery.installed(app) and "send_task" not in app.__dict__
    assert app.send_task == original
    after = [
        len(s.receivers) for s in (signals.before_task_publish, signals.task_prerun, signals.task_postrun)
    ]
    assert after == before


def test_uninstall_keeps_an_app_uninstalled_although_shared_tasks_install_every_app() -> None:
    @threadline.task(name=f"shared-{uuid.uuid4().hex[:6]}")
    def shared() -> None:  # a shared task: every app is installed when finalized
        pass

    kept = Celery("kept", broker="memory://", set_as_current=False)
    dropped = Celery("dropped", broker="memory://", set_as_current=False)
    threadline.celery.install(dropped)
    assert threadline.celery.uninstall(dropped) is True
    kept.finalize()
    dropped.finalize()
    assert threadline.celery.installed(kept) and shared.name in kept.tasks
    assert not threadline.celery.installed(dropped) and _receivers(dropped) == 0
    assert "send_task" not in dropped.__dict__
    threadline.celery.install(dropped)  # only install() brings it back
    assert threadline.celery.installed(dropped)
    for app in (kept, dropped):
        assert threadline.celery.uninstall(app) is True
        assert not threadline.celery.installed(app)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signature_policy": "drop"}, "'strip' or 'reject'"),
        ({"signature_policy": "reject"}, "needs signing_keys"),
        ({"signing_keys": KEY}, "a list of keys"),
        ({"signing_keys": ["short"]}, "at least 16 bytes"),
        ({"signing_keys": []}, "empty"),
        ({"signing_keys": [123]}, "str or bytes"),
        ({"max_header_bytes": 10}, "max_header_bytes"),
        ({"max_header_bytes": 10**6}, "max_header_bytes"),
    ],
)
def test_install_refuses_bad_options(kwargs: dict[str, Any], message: str) -> None:
    app = Celery("bad", broker="memory://", set_as_current=False)
    with pytest.raises(ConfigurationError, match=message):
        threadline.celery.install(app, **kwargs)
    assert not threadline.celery.installed(app)
    with pytest.raises(InvalidActor):
        threadline.celery.install(app, default_actor="nobody")


def test_task_decorator_forms() -> None:
    app = Celery("forms", broker="memory://", set_as_current=False)

    class Base(CeleryTask):  # type: ignore[misc]
        custom = True

    @threadline.task(app=app, bind=True, default_actor=ActorRef.system("nightly"), signature_policy="strip")
    def one(self: Any) -> None: ...

    @threadline.task(app=app, base=Base)
    def two() -> None: ...

    @threadline.task
    def shared() -> None: ...

    assert threadline.celery.installed(app)  # the decorator installed it
    assert isinstance(one, threadline.celery.Task) and one.threadline_default_actor == ActorRef.system(
        "nightly"
    )
    assert isinstance(two, threadline.celery.Task) and two.custom
    assert isinstance(app.tasks[shared.name], threadline.celery.Task)
    with pytest.raises(TypeError):
        threadline.task("positional")
    with pytest.raises(InvalidActor):
        threadline.task(default_actor="bad")
    with pytest.raises(ConfigurationError):
        threadline.task(signature_policy="maybe")
    threadline.celery.uninstall(app)


class _OwnRequest(celery_request.Request):
    """A request class an application names on its own task base."""


def test_task_decorator_keeps_the_request_class_a_base_names() -> None:
    app = Celery("requests", broker="memory://", set_as_current=False)

    class Own(CeleryTask):  # type: ignore[misc]
        Request = f"{__name__}:_OwnRequest"

    class Plain(CeleryTask):  # type: ignore[misc]
        pass

    @threadline.task(app=app, base=Own)
    def own() -> None: ...

    @threadline.task(app=app, base=Plain)
    def plain() -> None: ...

    try:
        # what the worker resolves for each message of the task
        assert symbol_by_name(own.Request) is _OwnRequest
        assert symbol_by_name(plain.Request) is celery_request.Request
    finally:
        threadline.celery.uninstall(app)


def test_worker_start_gives_tasks_on_a_base_of_their_own_the_request_class_and_uninstall_takes_it_back() -> (
    None
):
    app = Celery("own-base", broker="memory://", set_as_current=False)
    threadline.celery.install(app)

    class Own(CeleryTask):  # type: ignore[misc]
        pass

    @app.task(base=Own)
    def started_plain() -> None: ...

    @app.task(base=Own, Request=f"{__name__}:_OwnRequest")
    def started_named() -> None: ...

    class Worker:  # what worker_init is sent by: the worker, which has the app
        pass

    Worker.app = app  # type: ignore[attr-defined]
    try:
        app.finalize()
        assert started_plain.Request == celery_request.DEFAULT_REQUEST
        signals.worker_init.send(sender=Worker())
        assert symbol_by_name(started_plain.Request) is celery_request.Request
        assert symbol_by_name(started_named.Request) is _OwnRequest
    finally:
        threadline.celery.uninstall(app)
    assert started_plain.Request == celery_request.DEFAULT_REQUEST
    assert symbol_by_name(started_named.Request) is _OwnRequest


# -- publishing ------------------------------------------------------------------------------------


def test_every_publish_carries_the_header(memory_app: Celery) -> None:
    with web():
        tasks.record.delay("x")
        headers = published_headers(memory_app)
    assert isinstance(headers["threadline"], str)  # canonical JSON text: one string in the message
    assert json.loads(headers["threadline"]) == {
        "v": 1,
        "actor": {"type": "user", "id": "7"},
        "correlation_id": "corr-eager",
        "request_id": "req-eager",
        "causation_id": "req-eager",
    }
    tasks.record.delay("y")  # no context: no header
    assert "threadline" not in published_headers(memory_app)


def test_typical_header_is_small(memory_app: Celery) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2)]
    with threadline.context(actor=ActorRef.user("1234567"), correlation_id=ids[0], request_id=ids[1]):
        memory_app.send_task(tasks.NAME + "record", args=["x"])
        header = published_headers(memory_app)["threadline"]
    assert header == codec.dumps(json.loads(header)) and len(header.encode()) < 300
    threadline.celery.install(memory_app, signing_keys=[KEY])
    with threadline.context(actor=ActorRef.user("1234567"), correlation_id=ids[0], request_id=ids[1]):
        memory_app.send_task(tasks.NAME + "record", args=["x"])
        signed = published_headers(memory_app)["threadline"]
    assert json.loads(signed)["sig"].startswith("hmac-sha256:")
    assert signed == codec.dumps(json.loads(signed)) and len(signed.encode()) < 400


def test_a_context_that_cannot_be_encoded_raises_in_the_caller(
    memory_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    threadline.celery.install(memory_app, max_header_bytes=512)
    big = {"note": "x" * 600}
    with threadline.context(actor="user:1", meta=big):
        with pytest.raises(InvalidContext, match="limit is 512"):
            tasks.record.delay("x")
        with pytest.raises(InvalidContext, match="max_header_bytes"):
            memory_app.send_task(tasks.NAME + "record", args=["x"])
        with pytest.raises(InvalidContext):
            chain(tasks.record.si("a"), tasks.record.si("b")).delay()
        # a publish that bypasses send_task cannot raise here: it carries an error marker instead
        message = memory_app.amqp.create_task_message(str(uuid.uuid4()), tasks.NAME + "record", ["x"], {})
        with (
            caplog.at_level(logging.ERROR, "threadline.celery"),
            memory_app.producer_or_acquire() as producer,
        ):
            memory_app.amqp.send_task_message(producer, tasks.NAME + "record", message)
    assert "published without its audit context" in caplog.text
    marker = json.loads(published_headers(memory_app)["threadline"])
    assert marker["v"] == 1 and "limit is 512" in marker["error"]
    with pytest.raises(InvalidContext, match="not encoded by its publisher"):
        carrier.decode_wire(marker)
    with pytest.raises(queue.Empty):
        published_headers(memory_app)  # nothing else was published


def test_a_publish_around_send_task_from_another_thread_carries_the_context(memory_app: Celery) -> None:
    # The app is current in the thread that made it; a web server's request thread publishes.
    others = [app for app in list(threadline.propagation.celery._installations) if app is not memory_app]
    for app in others:  # the only app installed, as in most deployments
        threadline.celery.uninstall(app)
    try:
        sent: list[BaseException] = []

        def publish() -> None:
            try:
                message = memory_app.amqp.create_task_message(
                    str(uuid.uuid4()), tasks.NAME + "record", ["x"], {}
                )
                with (
                    threadline.context(actor="user:5", correlation_id="req-thread"),
                    memory_app.producer_or_acquire() as producer,
                ):
                    memory_app.amqp.send_task_message(producer, tasks.NAME + "record", message)
            except BaseException as exc:
                sent.append(exc)

        worker = threading.Thread(target=publish)
        worker.start()
        worker.join()
        assert sent == []
        header = json.loads(published_headers(memory_app)["threadline"])
        assert (header["actor"], header["correlation_id"]) == ({"type": "user", "id": "5"}, "req-thread")
    finally:
        for app in others:
            threadline.celery.install(app)


# -- the header codec ------------------------------------------------------------------------------


def test_decode_wire_accepts_dict_text_and_bytes() -> None:
    ctx = AuditContext(actor=ActorRef.user("1"), correlation_id="c", request_id="r", meta={"k": [1, 2.5]})
    body = carrier.wire_dict(ctx)
    for raw in (body, codec.dumps(body), codec.dumps(body).encode()):
        assert AuditContext(**carrier.decode_wire(raw)) == ctx
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    for raw in (
        '{"v":1,"meta":{"x":NaN}}',
        b"\xff",
        {"v": 1, "meta": {"x": deep}},
        {"v": 1, 2: "x"},
        {"v": True},
        "\ud800",  # a lone surrogate (JSON escapes can produce one): not encodable as UTF-8
        "x" * 9000,
    ):
        with pytest.raises(InvalidContext):
            carrier.decode_wire(raw)


def test_signatures_rotate_and_detect_tampering() -> None:
    keys = carrier.check_signing_keys([KEY, "an-older-key-still-accepted-0000"])
    body = carrier.seal({"v": 1, "actor": {"type": "user", "id": "1"}}, signing_key=keys[1], max_bytes=8192)
    assert carrier.decode_wire(body, keys=keys)["actor"] == ActorRef.user("1")
    with pytest.raises(UntrustedContext, match="matches none"):
        carrier.decode_wire({**body, "actor": {"type": "admin", "id": "1"}}, keys=keys)
    with pytest.raises(UntrustedContext, match="not signed"):
        carrier.decode_wire({"v": 1}, keys=keys)
    assert not codec.verify("text", "sha1:abc", keys)


def test_signed_text_is_verified_over_the_bytes_received() -> None:
    keys = carrier.check_signing_keys([KEY, "an-older-key-still-accepted-0000"])
    ctx = AuditContext(actor=ActorRef.user("1"), correlation_id="c", meta={"note": "é", "n": [1, 2.5]})
    body = carrier.wire_dict(ctx)
    for key in keys:  # the first key signs; after a rotation the old one still verifies
        text = carrier.encode_wire(body, signing_key=key, max_bytes=8192)
        # the same text as the dict with its signature, encoded canonically
        assert text == codec.dumps(carrier.seal(dict(body), signing_key=key, max_bytes=8192))
        for raw in (text, text.encode(), json.loads(text)):
            assert AuditContext(**carrier.decode_wire(raw, keys=keys)) == ctx
    signed = carrier.encode_wire(body, signing_key=keys[0], max_bytes=8192)
    signature = json.loads(signed)["sig"]
    forged = [
        signed.replace('"c"', '"d"'),  # a changed value
        signed.replace('"user"', '"admin"'),
        signed.replace(signature, signature[:-1] + ("0" if signature[-1] != "0" else "1")),
        signed.replace(signature, "hmac-sha256:" + "zz" * 32),
        signed.replace(signature, signature.upper()),
        signed.replace('"correlation_id":"c"', '"correlation_id":"c","correlation_id":"d"'),  # duplicate
        carrier.encode_wire(body, signing_key=b"someone-elses-key-0123456789abcd", max_bytes=8192),
    ]
    for raw in forged:
        with pytest.raises(UntrustedContext, match="matches none"):
            carrier.decode_wire(raw, keys=keys)
    with pytest.raises(UntrustedContext, match="not signed"):
        carrier.decode_wire(carrier.encode_wire(body, signing_key=None, max_bytes=8192), keys=keys)
    # another layout (spaces, key order) with a valid signature of the canonical form is accepted
    relaid = json.dumps(json.loads(signed), indent=1)
    assert AuditContext(**carrier.decode_wire(relaid, keys=keys)) == ctx
    # the cap applies to the text received
    for raw in (signed, signed.encode()):
        with pytest.raises(InvalidContext, match="limit is 100"):
            carrier.decode_wire(raw, keys=keys, max_bytes=100)
    with pytest.raises(InvalidContext, match="limit is 100"):
        carrier.encode_wire(body, signing_key=keys[0], max_bytes=100)
    # a publisher's error marker is refused before any signature check
    with pytest.raises(InvalidContext, match="not encoded by its publisher"):
        carrier.decode_wire('{"error":"too big","v":1}', keys=keys)
    exc = UntrustedContext("header is not signed")
    copy = pickle.loads(pickle.dumps(exc))
    assert (
        isinstance(copy, UntrustedContext)
        and str(copy) == str(exc) == "untrusted audit context: header is not signed"
    )


# -- inject / extract ------------------------------------------------------------------------------


def test_inject_and_extract_round_trip_for_other_transports() -> None:
    message_headers: dict[str, str] = {}
    ctx = AuditContext(
        actor=ActorRef.user("5"), correlation_id="c-5", request_id="r-5", origin="web", job={"id": "x"}
    )
    threadline.inject(message_headers, ctx)
    assert set(message_headers) == {"threadline"}
    received = threadline.extract(message_headers)
    # origin and job stay behind; the sender (its job, else its request) is the cause
    assert received == AuditContext(
        actor=ActorRef.user("5"), correlation_id="c-5", request_id="r-5", causation_id="x"
    )
    with threadline.context(actor="user:6", request_id="r-6"):
        assert threadline.extract(threadline.inject({})) == AuditContext(
            actor=ActorRef.user("6"), request_id="r-6", causation_id="r-6"
        )
    assert threadline.inject({}) == {}  # empty context: nothing to carry
    assert threadline.extract({}) is None
    kafka = {"threadline": message_headers["threadline"].encode()}  # byte-valued headers
    assert threadline.extract(kafka) == received


def test_inject_and_extract_with_signing() -> None:
    ctx = AuditContext(actor=ActorRef.user("5"))
    signed = threadline.inject({}, ctx, signing_key=KEY)
    assert threadline.extract(signed, signing_keys=["some-newer-key-000000000000000", KEY]) == ctx
    with pytest.raises(UntrustedContext):
        threadline.extract(threadline.inject({}, ctx), signing_keys=[KEY])
    tampered = {"threadline": signed["threadline"].replace('"5"', '"6"')}
    with pytest.raises(UntrustedContext):
        threadline.extract(tampered, signing_keys=[KEY])
    with pytest.raises(InvalidContext):
        threadline.extract({"threadline": "{"})
    with pytest.raises(InvalidContext, match="limit is 256"):
        threadline.inject({}, AuditContext(meta={"x": "y" * 300}), max_bytes=256)
