"""OpenTelemetry: span ids on the audited transactions (every way a transaction gets its context),
the way back from a trace id to its transactions, and the W3C ``traceparent`` correlation option
of the web middleware. Real PostgreSQL, the OpenTelemetry SDK with an in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any
from wsgiref.util import setup_testing_defaults

import psycopg
import pytest
from celery import Celery
from kombu import Connection
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import threadline
import threadline.otel
from threadline import ActorRef, AuditContext, ConfigurationError, InvalidFilter, ThreadlineConnection
from threadline.core import fields
from threadline.propagation import psycopg as tl_psycopg
from threadline.propagation import sqlalchemy as tl_sqlalchemy
from threadline.propagation.web import (
    ASGIMiddleware,
    CorrelationPolicy,
    WSGIMiddleware,
    trace_id_from_traceparent,
)

from .conftest import transactions
from .test_sqlalchemy import sa_url

UUID_LEN = 36
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> trace.Tracer:
    """A tracer of a provider of its own (the global provider is left alone)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("threadline-tests")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Closes the connections and engines a test opened."""
    with ExitStack() as s:
        yield s


@pytest.fixture
def otel() -> Iterator[None]:
    threadline.otel.install()
    try:
        yield
    finally:
        threadline.otel.uninstall()


def ids(span: trace.Span) -> dict[str, str]:
    """What a transaction written in ``span`` records under ``meta["otel"]``."""
    sc = span.get_span_context()
    return {"trace_id": format(sc.trace_id, "032x"), "span_id": format(sc.span_id, "016x")}


def last_meta(conn: psycopg.Connection[Any], count: int = 1) -> list[Any]:
    return [row["meta"] for row in transactions(conn)[-count:]]


# -- the ways a transaction gets its context ----------------------------------------------------------
#
# Each writer inserts one row into app.posts in a transaction of its own, under the current context.


def _plain_transaction(dsn: str, stack: ExitStack | None = None) -> Callable[[int], None]:
    def write(i: int) -> None:
        with psycopg.connect(dsn) as c, threadline.transaction(c):
            c.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])

    return write


def _nested_savepoint(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    def write(i: int) -> None:
        with psycopg.connect(dsn) as c, threadline.transaction(c), threadline.transaction(c):
            c.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])

    return write


def _apply_context(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    def write(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
            threadline.apply_context(c)
            c.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])

    return write


def _threadline_connection(dsn: str, stack: ExitStack, **kwargs: Any) -> Callable[[int], None]:
    conn = stack.enter_context(ThreadlineConnection.connect(dsn, **kwargs))

    def write(i: int) -> None:
        conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
        if not conn.autocommit:
            conn.commit()

    return write


def _threadline_block(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    conn = stack.enter_context(ThreadlineConnection.connect(dsn, autocommit=True))

    def write(i: int) -> None:
        with conn.transaction():
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])

    return write


def _begin_with_context(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    conn = stack.enter_context(psycopg.connect(dsn))

    def write(i: int) -> None:
        tl_psycopg.begin_with_context(conn, threadline.current())
        conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
        conn.commit()

    return write


def _async_transaction(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    def write(i: int) -> None:
        async def run() -> None:
            async with await psycopg.AsyncConnection.connect(dsn) as c, threadline.transaction(c):
                await c.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])

        asyncio.run(run())

    return write


def _sqlalchemy_sync(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    engine = create_engine(sa_url(dsn), pool_size=1)
    stack.callback(engine.dispose)
    tl_sqlalchemy.install(engine)

    def write(i: int) -> None:
        with engine.begin() as c:
            c.execute(text("INSERT INTO app.posts (id) VALUES (:i)"), {"i": i})

    return write


def _sqlalchemy_async(dsn: str, stack: ExitStack) -> Callable[[int], None]:
    def write(i: int) -> None:
        async def run() -> None:
            engine = create_async_engine(sa_url(dsn), pool_size=1)
            tl_sqlalchemy.install(engine)
            try:
                async with engine.begin() as c:
                    await c.execute(text("INSERT INTO app.posts (id) VALUES (:i)"), {"i": i})
            finally:
                await engine.dispose()

        asyncio.run(run())

    return write


WRITERS: dict[str, Callable[[str, ExitStack], Callable[[int], None]]] = {
    "threadline.transaction": _plain_transaction,
    "threadline.transaction, savepoint": _nested_savepoint,
    "apply_context": _apply_context,
    "ThreadlineConnection, implicit": _threadline_connection,
    "ThreadlineConnection, implicit, ClientCursor": lambda dsn, stack: _threadline_connection(
        dsn, stack, cursor_factory=psycopg.ClientCursor
    ),
    "ThreadlineConnection, autocommit": lambda dsn, stack: _threadline_connection(
        dsn, stack, autocommit=True
    ),
    "ThreadlineConnection, autocommit, ClientCursor": lambda dsn, stack: _threadline_connection(
        dsn, stack, autocommit=True, cursor_factory=psycopg.ClientCursor
    ),
    "ThreadlineConnection, transaction()": _threadline_block,
    "begin_with_context": _begin_with_context,
    "AsyncConnection, threadline.transaction": _async_transaction,
    "SQLAlchemy": _sqlalchemy_sync,
    "SQLAlchemy asyncio": _sqlalchemy_async,
}


@pytest.mark.parametrize("way", sorted(WRITERS))
def test_a_transaction_in_a_span_records_its_ids_beside_the_meta(
    way: str,
    conn: psycopg.Connection[Any],
    dsn: str,
    posts: str,
    otel: None,
    tracer: trace.Tracer,
    stack: ExitStack,
) -> None:
    write = WRITERS[way](dsn, stack)
    # one context object, two spans: each transaction records the span it ran in
    with threadline.context(actor=ActorRef.user("7"), meta={"tenant": "acme"}) as ctx:
        with tracer.start_as_current_span("first") as first:
            write(1)
        with tracer.start_as_current_span("second") as second:
            write(2)
        write(3)  # no span
        assert threadline.current() is ctx and dict(ctx.meta or {}) == {"tenant": "acme"}
    assert ids(first) != ids(second)
    assert last_meta(conn, 3) == [
        {"tenant": "acme", "otel": ids(first)},
        {"tenant": "acme", "otel": ids(second)},
        {"tenant": "acme"},
    ]
    rows = transactions(conn)[-3:]
    assert [r["actor"] for r in rows] == [{"type": "user", "id": "7"}] * 3


def test_ids_are_lowercase_hex_of_the_span(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None, tracer: trace.Tracer
) -> None:
    with threadline.context(correlation_id="c-1"), tracer.start_as_current_span("s") as span:
        _plain_transaction(dsn)(1)
    recorded = last_meta(conn)[0]["otel"]
    sc = span.get_span_context()
    assert len(recorded["trace_id"]) == 32 and len(recorded["span_id"]) == 16
    assert recorded["trace_id"] == recorded["trace_id"].lower()
    assert int(recorded["trace_id"], 16) == sc.trace_id and int(recorded["span_id"], 16) == sc.span_id


def test_outside_a_valid_span_nothing_is_added(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None
) -> None:
    write = _plain_transaction(dsn)
    with threadline.context(correlation_id="c-1"):
        write(1)
        with trace.use_span(trace.INVALID_SPAN):
            write(2)
    with threadline.context(correlation_id="c-2", meta={"k": 1}):
        write(3)
    assert last_meta(conn, 3) == [None, None, {"k": 1}]


def test_a_transaction_with_no_context_carries_nothing(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None, tracer: trace.Tracer, stack: ExitStack
) -> None:
    with tracer.start_as_current_span("s"):
        assert tl_psycopg.context_payload() == ""
        _threadline_connection(dsn, stack)(1)
    row = transactions(conn)[-1]
    assert (row["meta"], row["actor"], row["correlation_id"]) == (None, None, None)


def test_uninstall_undoes_install(
    conn: psycopg.Connection[Any], dsn: str, posts: str, tracer: trace.Tracer, stack: ExitStack
) -> None:
    assert not threadline.otel.installed()
    assert threadline.otel.uninstall() is False
    threadline.otel.install()
    threadline.otel.install()  # idempotent
    assert threadline.otel.installed() and tl_psycopg.payload_enricher() is not None
    write = _threadline_connection(dsn, stack)
    ctx = AuditContext(correlation_id="c-1", meta={"tenant": "acme"})
    with threadline.use_context(ctx), tracer.start_as_current_span("s") as span:
        write(1)
        assert threadline.otel.uninstall() is True
        assert not threadline.otel.installed() and tl_psycopg.payload_enricher() is None
        write(2)  # the same context object, the same span: nothing cached survives
        assert tl_psycopg.context_payload() == ctx.to_json()
    assert last_meta(conn, 2) == [{"tenant": "acme", "otel": ids(span)}, {"tenant": "acme"}]


def test_an_applications_otel_key_is_replaced_only_in_a_span(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None, tracer: trace.Tracer
) -> None:
    write = _plain_transaction(dsn)
    with threadline.context(meta={"otel": "mine", "n": [1, 2]}):
        with tracer.start_as_current_span("s") as span:
            write(1)
        write(2)
    assert last_meta(conn, 2) == [{"otel": ids(span), "n": [1, 2]}, {"otel": "mine", "n": [1, 2]}]


def test_meta_that_would_exceed_its_limit_is_recorded_without_the_ids(
    conn: psycopg.Connection[Any],
    dsn: str,
    posts: str,
    otel: None,
    tracer: trace.Tracer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="threadline.otel")
    before = fields.limits()
    fields.set_limits(max_meta_bytes=200)
    try:
        big = {"blob": "x" * 150}  # fits alone, not with the ids (about 90 bytes more)
        with threadline.context(correlation_id="c-1", meta=big), tracer.start_as_current_span("s"):
            _plain_transaction(dsn)(1)
            _plain_transaction(dsn)(2)
        with threadline.context(correlation_id="c-2", meta={"k": 1}), tracer.start_as_current_span("t") as ok:
            _plain_transaction(dsn)(3)
    finally:
        fields.set_limits(max_meta_bytes=before.max_meta_bytes)
    assert last_meta(conn, 3) == [big, big, {"k": 1, "otel": ids(ok)}]
    warnings = [r for r in caplog.records if "without its OpenTelemetry span ids" in r.getMessage()]
    assert len(warnings) == 1 and "'meta'" in warnings[0].getMessage()


def test_the_context_and_celery_headers_get_no_ids(otel: None, tracer: trace.Tracer) -> None:
    app = Celery("otel", broker=f"memory://localhost/{uuid.uuid4().hex}", set_as_current=False)
    app.conf.task_default_queue = f"q-{uuid.uuid4().hex[:8]}"
    threadline.celery.install(app)
    try:
        with (
            threadline.context(actor=ActorRef.user("7"), correlation_id="c-1", meta={"k": 1}) as ctx,
            tracer.start_as_current_span("publisher"),
        ):
            expected = ctx.to_json()
            assert "otel" in tl_psycopg.context_payload()  # the database setting has them...
            assert threadline.current().to_json() == expected  # ...the context does not
            assert dict(threadline.current().meta or {}) == {"k": 1}
            assert json.loads(threadline.inject({})["threadline"])["meta"] == {"k": 1}
            app.send_task("otel.anything", args=[1])
        with Connection(app.conf.broker_url) as broker:
            message = broker.SimpleQueue(app.conf.task_default_queue).get(timeout=1)
            message.ack()
        header = message.headers["threadline"]
        assert "otel" not in header and json.loads(header)["meta"] == {"k": 1}
        assert threadline.AuditContext.from_json(header).meta == {"k": 1}
    finally:
        threadline.celery.uninstall(app)


def test_install_refuses_to_replace_another_enricher() -> None:
    def other(ctx: AuditContext) -> str:
        return ctx.to_json()

    assert tl_psycopg.set_payload_enricher(other) is None
    try:
        with pytest.raises(ConfigurationError, match="already computed"):
            threadline.otel.install()
        assert threadline.otel.uninstall() is False  # leaves the other one alone
        assert tl_psycopg.payload_enricher() is other
    finally:
        tl_psycopg.set_payload_enricher(None)


def test_opentelemetry_is_optional() -> None:
    code = (
        "import sys\n"
        "import threadline, threadline.propagation.web, threadline.propagation.psycopg, threadline.celery\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
        "sys.modules['opentelemetry'] = None\n"
        "import threadline.otel\n"
        "try:\n"
        "    threadline.otel.install()\n"
        "except threadline.ConfigurationError as exc:\n"
        "    print(exc)\n"
        "print(threadline.otel.installed())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "pip install 'threadline[otel]'" in lines[0] and lines[1] == "False"


# -- from a trace id to its transactions, and back ---------------------------------------------------


def test_transactions_for_trace_and_back(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None, tracer: trace.Tracer
) -> None:
    write = _plain_transaction(dsn)
    with threadline.context(correlation_id="c-1", meta={"k": 1}):
        with tracer.start_as_current_span("request") as request:
            write(1)
            with tracer.start_as_current_span("child") as child:
                write(2)
        with tracer.start_as_current_span("other") as other:
            write(3)
        write(4)
    trace_id = ids(request)["trace_id"]
    assert ids(child)["trace_id"] == trace_id != ids(other)["trace_id"]

    found = threadline.otel.transactions_for_trace(conn, trace_id)
    assert [t.meta for t in found] == [{"k": 1, "otel": ids(request)}, {"k": 1, "otel": ids(child)}]
    assert [threadline.otel.trace_ids(t) for t in found] == [
        (trace_id, ids(request)["span_id"]),
        (trace_id, ids(child)["span_id"]),
    ]
    changed = [threadline.changes_for_transaction(conn, t.id)[0].after["id"] for t in found]
    assert changed == [1, 2]
    one_span = threadline.otel.transactions_for_trace(conn, trace_id, span_id=ids(child)["span_id"])
    assert [t.id for t in one_span] == [found[1].id]
    assert threadline.otel.transactions_for_trace(conn, "0123456789abcdef0123456789abcdef") == []
    untraced = threadline.changes_for_transaction(conn, transactions(conn)[-1]["id"])[0].transaction
    assert untraced is not None and threadline.otel.trace_ids(untraced) is None

    async def run() -> list[threadline.Transaction]:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            return await threadline.otel.transactions_for_trace_async(aconn, ids(other)["trace_id"])

    assert [t.meta for t in asyncio.run(run())] == [{"k": 1, "otel": ids(other)}]


@pytest.mark.parametrize(
    "bad",
    [
        TRACE_ID.upper(),
        TRACE_ID[:-1],
        TRACE_ID + "0",
        "0" * 32,
        "g" * 32,
        f" {TRACE_ID[1:]}",
        "",
        None,
        int(TRACE_ID, 16),
    ],
)
def test_transactions_for_trace_refuses_malformed_ids(conn: psycopg.Connection[Any], bad: Any) -> None:
    with pytest.raises(InvalidFilter, match="trace_id"):
        threadline.otel.transactions_for_trace(conn, bad)


def test_transactions_for_trace_refuses_bad_span_ids_and_schemas(conn: psycopg.Connection[Any]) -> None:
    for bad in (PARENT_ID.upper(), "0" * 16, PARENT_ID[:-1], 5):
        with pytest.raises(InvalidFilter, match="span_id"):
            threadline.otel.transactions_for_trace(conn, TRACE_ID, span_id=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidFilter):
        threadline.otel.transactions_for_trace(conn, TRACE_ID, audit_schema="no such schema")


# -- traceparent as the correlation id ---------------------------------------------------------------


def call_wsgi(app: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Call a WSGI app in-process; return (response headers, the context the app saw)."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: dict[str, str] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen.update(response_headers)

    body = b"".join(app(environ, start_response))
    return seen, json.loads(body)


def context_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(threadline.current().to_dict()).encode()]


async def context_asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(threadline.current().to_dict()).encode()})


def call_asgi(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[dict[bytes, bytes], dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "headers": headers, "client": ("10.0.0.1", 5)}, None, send))
    return dict(sent[0]["headers"]), json.loads(sent[1]["body"])


BAD_TRACEPARENTS = {
    "version 01": f"01-{TRACE_ID}-{PARENT_ID}-01",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "version 00 with more": f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
    "upper-case trace id": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "upper-case flags": f"00-{TRACE_ID}-{PARENT_ID}-0A",
    "all-zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "all-zero parent id": f"00-{TRACE_ID}-{'0' * 16}-01",
    "short trace id": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "long parent id": f"00-{TRACE_ID}-{PARENT_ID}0-01",
    "one flag digit": f"00-{TRACE_ID}-{PARENT_ID}-1",
    "not hex": f"00-{'z' * 32}-{PARENT_ID}-01",
    "underscores": f"00_{TRACE_ID}_{PARENT_ID}_01",
    "leading space": f" {TRACEPARENT}",
    "trailing newline": f"{TRACEPARENT}\n",
    "two joined": f"{TRACEPARENT},{TRACEPARENT}",
    "empty": "",
    "crlf": f"00-{TRACE_ID}\r\nSet-Cookie: x=1",
}


def test_trace_id_from_traceparent() -> None:
    assert trace_id_from_traceparent(TRACEPARENT) == TRACE_ID
    assert trace_id_from_traceparent(TRACEPARENT.encode()) == TRACE_ID
    assert trace_id_from_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00") == TRACE_ID  # not sampled
    assert trace_id_from_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-ff") == TRACE_ID
    for bad in BAD_TRACEPARENTS.values():
        assert trace_id_from_traceparent(bad) is None, bad
        assert trace_id_from_traceparent(bad.encode()) is None, bad


def test_wsgi_correlation_from_traceparent() -> None:
    app = WSGIMiddleware(context_app, correlation_from_traceparent=True)
    headers, ctx = call_wsgi(app, {"traceparent": TRACEPARENT})
    assert ctx["correlation_id"] == TRACE_ID and headers["X-Correlation-ID"] == TRACE_ID
    assert len(ctx["request_id"]) == UUID_LEN
    # an explicit correlation header wins, the second one too
    _, ctx = call_wsgi(app, {"traceparent": TRACEPARENT, "X-Correlation-ID": "explicit-1"})
    assert ctx["correlation_id"] == "explicit-1"
    _, ctx = call_wsgi(app, {"traceparent": TRACEPARENT, "X-Request-ID": "explicit-2"})
    assert ctx["correlation_id"] == "explicit-2"
    # a refused correlation header does not hide a good traceparent
    _, ctx = call_wsgi(app, {"traceparent": TRACEPARENT, "X-Correlation-ID": "bad id"})
    assert ctx["correlation_id"] == TRACE_ID
    # off by default
    _, ctx = call_wsgi(WSGIMiddleware(context_app), {"traceparent": TRACEPARENT})
    assert len(ctx["correlation_id"]) == UUID_LEN


@pytest.mark.parametrize("name", sorted(BAD_TRACEPARENTS))
def test_an_invalid_traceparent_falls_back(name: str, caplog: pytest.LogCaptureFixture) -> None:
    bad = BAD_TRACEPARENTS[name]
    caplog.set_level(logging.WARNING, logger="threadline.web")
    headers, ctx = call_wsgi(
        WSGIMiddleware(context_app, correlation_from_traceparent=True), {"traceparent": bad}
    )
    assert len(ctx["correlation_id"]) == UUID_LEN and headers["X-Correlation-ID"] == ctx["correlation_id"]
    _, ctx = call_asgi(
        ASGIMiddleware(context_asgi_app, correlation_from_traceparent=True), [(b"traceparent", bad.encode())]
    )
    assert len(ctx["correlation_id"]) == UUID_LEN
    _, ctx = call_asgi(
        ASGIMiddleware(context_asgi_app, correlation_from_traceparent=True),
        [(b"traceparent", bad.encode()), (b"x-request-id", b"explicit")],
    )
    assert ctx["correlation_id"] == "explicit"
    refusals = [
        r.getMessage() for r in caplog.records if "ignored the incoming traceparent" in r.getMessage()
    ]
    assert len(refusals) == 2
    for message in refusals:
        assert "\r" not in message and "\n" not in message


def test_asgi_correlation_from_traceparent(caplog: pytest.LogCaptureFixture) -> None:
    app = ASGIMiddleware(context_asgi_app, correlation_from_traceparent=True)
    headers, ctx = call_asgi(app, [(b"traceparent", TRACEPARENT.encode())])
    assert ctx["correlation_id"] == TRACE_ID and headers[b"x-correlation-id"] == TRACE_ID.encode()
    _, ctx = call_asgi(app, [(b"traceparent", TRACEPARENT.encode()), (b"x-correlation-id", b"explicit")])
    assert ctx["correlation_id"] == "explicit"
    _, ctx = call_asgi(app, [(b"x-correlation-id", b"bad id"), (b"traceparent", TRACEPARENT.encode())])
    assert ctx["correlation_id"] == TRACE_ID
    # W3C trace-context: a traceparent sent twice is invalid, even when both copies are
    caplog.set_level(logging.WARNING, logger="threadline.web")
    _, ctx = call_asgi(app, [(b"traceparent", TRACEPARENT.encode())] * 2)
    assert len(ctx["correlation_id"]) == UUID_LEN
    assert any("sent more than once" in r.getMessage() for r in caplog.records)
    _, ctx = call_asgi(ASGIMiddleware(context_asgi_app), [(b"traceparent", TRACEPARENT.encode())])
    assert len(ctx["correlation_id"]) == UUID_LEN  # off by default


def test_traceparent_option_is_validated() -> None:
    assert CorrelationPolicy(from_traceparent=True).from_traceparent
    assert not CorrelationPolicy().from_traceparent
    with pytest.raises(ConfigurationError, match="max_id_length"):
        CorrelationPolicy(max_id_length=31, from_traceparent=True)
    CorrelationPolicy(max_id_length=32, from_traceparent=True)
    with pytest.raises(ConfigurationError, match="from_traceparent"):
        WSGIMiddleware(context_app, correlation_from_traceparent="yes")  # type: ignore[arg-type]


def test_web_request_leads_to_its_trace_and_back(
    conn: psycopg.Connection[Any], dsn: str, posts: str, otel: None, tracer: trace.Tracer
) -> None:
    """The request's correlation id is the incoming trace id, and its transaction records the
    server span (a child of the incoming one, as an instrumented server makes it)."""
    write = _plain_transaction(dsn)
    incoming = trace.NonRecordingSpan(
        trace.SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), is_remote=True)
    )

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with tracer.start_as_current_span("server", context=trace.set_span_in_context(incoming)) as span:
            write(1)
        start_response("200 OK", [])
        return [json.dumps(ids(span)).encode()]

    _, server = call_wsgi(
        WSGIMiddleware(app, correlation_from_traceparent=True), {"traceparent": TRACEPARENT}
    )
    row = transactions(conn)[-1]
    assert row["correlation_id"] == TRACE_ID == server["trace_id"]
    assert row["meta"]["otel"] == server and server["span_id"] != PARENT_ID
    assert [t.id for t in threadline.otel.transactions_for_trace(conn, row["correlation_id"])] == [row["id"]]


@pytest.fixture
def django_settings(database: str) -> Iterator[None]:
    import os

    from .celery_app.harness import env_var

    with env_var("THREADLINE_TEST_CELERY_DSN", os.environ.get("THREADLINE_TEST_CELERY_DSN") or database):
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")
        import django

        django.setup()
        yield


def test_django_setting_correlation_from_traceparent(django_settings: None) -> None:
    from django.http import HttpResponse
    from django.test import RequestFactory, override_settings

    from threadline.propagation.django import ThreadlineMiddleware, load_settings

    def view(request: Any) -> HttpResponse:
        return HttpResponse(threadline.current().correlation_id)

    request = RequestFactory().get("/", headers={"traceparent": TRACEPARENT})
    with override_settings(THREADLINE={"CORRELATION_FROM_TRACEPARENT": True}):
        assert load_settings().correlation_from_traceparent
        assert ThreadlineMiddleware(view)(request).content == TRACE_ID.encode()
        bad = RequestFactory().get("/", headers={"traceparent": BAD_TRACEPARENTS["version 01"]})
        assert len(ThreadlineMiddleware(view)(bad).content) == UUID_LEN
        explicit = RequestFactory().get("/", headers={"traceparent": TRACEPARENT, "X-Correlation-ID": "e-1"})
        assert ThreadlineMiddleware(view)(explicit).content == b"e-1"
    with override_settings(THREADLINE={}):
        assert not load_settings().correlation_from_traceparent
        assert len(ThreadlineMiddleware(view)(request).content) == UUID_LEN
    with (
        override_settings(THREADLINE={"CORRELATION_FROM_TRACEPARENT": True, "MAX_ID_LENGTH": 16}),
        pytest.raises(ConfigurationError),
    ):
        ThreadlineMiddleware(view)
