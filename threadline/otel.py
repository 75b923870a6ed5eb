"""OpenTelemetry: the active span's trace and span ids on every audited transaction, opt-in.

Set-up (``pip install 'threadline[otel]'``)::

    import threadline.otel
    threadline.otel.install()                  # idempotent; uninstall() undoes it

From then on, a database transaction whose audit context is computed while an OpenTelemetry span
is active records that span's ids in its ``transactions.meta``::

    {"otel": {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}}

(lowercase hex, 32 and 16 characters). What is recorded and when:

- The ids are taken when threadline computes the transaction's context setting, that is when the
  transaction begins with a context (or when the context changes inside it), in the thread or task
  that runs it: the span active there and then. A span started later in the same transaction does
  not change what the transaction records.
- They are merged into the context's own ``meta``: the other keys are kept, a key ``"otel"`` the
  application set itself is replaced while a span is active (and kept as it is when none is).
- Only the database setting gets them. The current :class:`~threadline.core.context.AuditContext` is
  not changed, and Celery headers (``threadline.inject()`` too) do not carry them: a worker
  records the span active in the worker (its own, child of the publisher's when the OpenTelemetry
  Celery instrumentation propagates the trace).
- A transaction that runs with no audit context at all carries nothing (no setting is sent for
  it), so it records no ids either. Outside a valid span nothing is added.
- If the ids would take ``meta`` over its size limit (``threadline.core.fields.set_limits``) the
  transaction is recorded without them (one warning is logged), never refused.

Back and forth between the audit trail and the tracing back end: :func:`trace_ids` gives the ids of
a :class:`~threadline.core.records.Transaction` (open them in Jaeger or Tempo), and
:func:`transactions_for_trace` gives the transactions a trace id recorded. The web middleware can
also use the incoming W3C ``traceparent`` trace id as the correlation id
(``correlation_from_traceparent=True``; see ``docs/web.md``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from threadline.core import fields
from threadline.core._connection import ConnectionLike
from threadline.core._run import Plan, Query, run, run_async
from threadline.core.context import AuditContext
from threadline.core.errors import ConfigurationError, InvalidContext, InvalidFilter
from threadline.core.records import Transaction
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore.arguments import audit_identifier
from threadline.explore.selection import TRANSACTION_COLUMNS
from threadline.propagation import psycopg as tl_psycopg

__all__ = [
    "META_KEY",
    "install",
    "installed",
    "trace_ids",
    "transactions_for_trace",
    "transactions_for_trace_async",
    "uninstall",
]

META_KEY = "otel"
"""The ``meta`` key under which a transaction records ``{"trace_id": ..., "span_id": ...}``."""

logger = logging.getLogger("threadline.otel")

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

_lock = threading.Lock()
_state: dict[str, Any] = {"warned": False}
# the last payload computed: (context, trace id, span id, payload); transactions opened one after
# the other in the same span under the same context (a request's) share it
_last: tuple[AuditContext, int, int, str] | None = None


def _current_span_getter() -> Callable[[], Any]:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigurationError(
            "threadline.otel needs the OpenTelemetry API: pip install 'threadline[otel]' "
            "(or pip install opentelemetry-api)"
        ) from exc
    get_current_span: Callable[[], Any] = trace.get_current_span
    return get_current_span


def install() -> None:
    """Record the active OpenTelemetry span's ids in every audited transaction (idempotent).

    Raises :class:`~threadline.core.errors.ConfigurationError` when the OpenTelemetry API is not
    installed (``pip install 'threadline[otel]'``), or when another integration already computes
    the database setting (:func:`threadline.propagation.psycopg.set_payload_enricher`).
    """
    get_current_span = _current_span_getter()
    with _lock:
        current = tl_psycopg.payload_enricher()
        if current is _enrich:
            return
        if current is not None:
            raise ConfigurationError(
                f"threadline.otel.install(): the database setting is already computed by {current!r}; "
                "only one payload enricher can be installed"
            )
        _state["get_current_span"] = get_current_span
        _state["warned"] = False
        tl_psycopg.set_payload_enricher(_enrich)


def uninstall() -> bool:
    """Undo :func:`install`: transactions opened from now on record no span ids.

    Returns ``False`` when it was not installed.
    """
    global _last
    with _lock:
        if tl_psycopg.payload_enricher() is not _enrich:
            return False
        tl_psycopg.set_payload_enricher(None)
        _last = None
        return True


def installed() -> bool:
    """True while :func:`install` is in force."""
    return tl_psycopg.payload_enricher() is _enrich


def _enrich(ctx: AuditContext) -> str:
    """The database setting of ``ctx``: its canonical JSON, with the active span's ids in
    ``meta["otel"]`` when a valid span is active."""
    global _last
    try:
        span_context = _state["get_current_span"]().get_span_context()
        valid = span_context.is_valid
    except Exception:  # a tracing problem must never fail a database write
        return tl_psycopg.setting_json(ctx)
    if not valid:
        return tl_psycopg.setting_json(ctx)
    trace_id, span_id = span_context.trace_id, span_context.span_id
    last = _last
    if last is not None and last[0] is ctx and last[1] == trace_id and last[2] == span_id:
        return last[3]
    payload = _with_ids(ctx, format(trace_id, "032x"), format(span_id, "016x"))
    _last = (ctx, trace_id, span_id, payload)
    return payload


def _with_ids(ctx: AuditContext, trace_id: str, span_id: str) -> str:
    """``ctx``'s canonical JSON with ``meta["otel"]`` set; without them
    (:func:`~threadline.propagation.psycopg.setting_json`) when that would not pass the context's
    checks."""
    meta = {} if ctx.meta is None else dict(ctx.meta)
    meta[META_KEY] = {"trace_id": trace_id, "span_id": span_id}
    try:
        checked = fields.check_mapping("meta", meta)
        data = ctx.to_dict()
        data["meta"] = checked
        text = fields.dumps(data)
        cap = fields.limits().max_encoded_bytes
        if len(text.encode()) > cap:
            raise InvalidContext("context", f"encodes to more than {cap} bytes with the span ids")
    except InvalidContext as exc:
        if not _state["warned"]:
            _state["warned"] = True
            logger.warning(
                "threadline: a transaction is recorded without its OpenTelemetry span ids: %s (logged once)",
                exc,
            )
        return tl_psycopg.setting_json(ctx)
    return text


def trace_ids(transaction: Transaction) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` recorded by ``transaction`` (a :class:`~threadline.core.records.Transaction`
    from any query function), or ``None`` when it recorded none (or not in the expected form).

    The trace id is what Jaeger, Tempo and other back ends look a trace up by.
    """
    meta = transaction.meta
    ids = None if meta is None else meta.get(META_KEY)
    if not isinstance(ids, Mapping):
        return None
    trace_id, span_id = ids.get("trace_id"), ids.get("span_id")
    if (
        isinstance(trace_id, str)
        and isinstance(span_id, str)
        and _TRACE_ID.fullmatch(trace_id)
        and _SPAN_ID.fullmatch(span_id)
    ):
        return trace_id, span_id
    return None


def _check_trace_id(trace_id: Any) -> str:
    if not isinstance(trace_id, str):
        raise InvalidFilter(f"trace_id must be a string, got {type(trace_id).__name__}")
    if not _TRACE_ID.fullmatch(trace_id) or trace_id == _ZERO_TRACE_ID:
        raise InvalidFilter(
            f"trace_id must be 32 lowercase hexadecimal digits, not all zero, got {trace_id[:64]!r}"
        )
    return trace_id


def _check_span_id(span_id: Any) -> str | None:
    if span_id is None:
        return None
    if not isinstance(span_id, str) or not _SPAN_ID.fullmatch(span_id) or span_id == _ZERO_SPAN_ID:
        shown = span_id[:64] if isinstance(span_id, str) else span_id
        raise InvalidFilter(f"span_id must be 16 lowercase hexadecimal digits, not all zero, got {shown!r}")
    return span_id


def _trace_plan(trace_id: str, span_id: str | None, audit_schema: str) -> Plan[list[Transaction]]:
    audit = audit_identifier(audit_schema)
    params = {"trace_id": _check_trace_id(trace_id), "span_id": _check_span_id(span_id)}
    # the expression an index on the trace id would be built on (see docs/web.md)
    where: sql.Composable = sql.SQL(" WHERE (t.meta -> 'otel' ->> 'trace_id') = %(trace_id)s")
    if span_id is not None:
        where += sql.SQL(" AND (t.meta -> 'otel' ->> 'span_id') = %(span_id)s")
    rows = yield Query(
        sql.SQL("SELECT {} FROM {}.transactions t").format(TRANSACTION_COLUMNS, audit)
        + where
        + sql.SQL(" ORDER BY t.occurred_at, t.id"),
        params,
    )
    return [Transaction.from_row(row, "t_") for row in rows]


def transactions_for_trace(
    conn: ConnectionLike, trace_id: str, *, span_id: str | None = None, audit_schema: str = DEFAULT_SCHEMA
) -> list[Transaction]:
    """The transactions that recorded OpenTelemetry trace ``trace_id``, oldest first.

    ``trace_id``: 32 lowercase hex digits, as the tracing back end shows it; ``span_id`` (16)
    narrows the result to the transactions of one span. A malformed id raises
    :class:`~threadline.core.errors.InvalidFilter` before anything is read. With
    :func:`threadline.changes_for_transaction` each leads on to the rows it changed.
    """
    return run(conn, _trace_plan(trace_id, span_id, audit_schema))


async def transactions_for_trace_async(
    conn: psycopg.AsyncConnection[Any],
    trace_id: str,
    *,
    span_id: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[Transaction]:
    """Async twin of :func:`transactions_for_trace`."""
    return await run_async(conn, _trace_plan(trace_id, span_id, audit_schema))
