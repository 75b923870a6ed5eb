"""Semantic events: "who did what and why", next to the row changes they explain.

:func:`record_action` writes one row of ``actions``; the actor, correlation id, request id and job
id default from the current :class:`~threadline.core.context.AuditContext`. Recorded inside an open
transaction, the action is linked from that transaction's ``transactions`` row
(``transactions.action_id``), whether the transaction's first audited write comes before or after
it: the transaction row is created (by the schema's ``link_action()``, through the same function
the capture triggers use) when the action is recorded, and the triggers then attach their changes
to it. The first action recorded in a transaction is the one linked. Such a transaction keeps its
``transactions`` row, with its context, even if it writes no tracked table.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.types.json import Jsonb

from threadline.core import fields
from threadline.core._connection import ConnectionLike, native
from threadline.core._run import Plan, Query, run, run_async
from threadline.core.actor import FORBIDDEN_TEXT, FORBIDDEN_TEXT_RE, ActorRef
from threadline.core.context import current
from threadline.core.errors import InvalidAction, InvalidActor, InvalidContext, InvalidFilter, SchemaError
from threadline.core.records import Action
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.explore.arguments import ActorLike, check_actor, check_limit, check_text_filter, check_window

MAX_SHORT = 256
"""Longest ``name``, ``status``, ``verb`` and ``category``."""
MAX_TEXT = 10_000
"""Longest ``reason`` and ``comment``."""

# long text (reason, comment) may hold tabs and line breaks, nothing else FORBIDDEN_TEXT_RE refuses
_TEXT_CONTROL_RE = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_COLUMNS = (
    "id, name, actor, status, verb, category, reason, comment, correlation_id, request_id, job_id, "
    "meta, inserted_at"
)


def _short(name: str, value: str | None, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise InvalidAction(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise InvalidAction(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidAction(f"{name} must not be empty")
    if len(value) > MAX_SHORT:
        raise InvalidAction(f"{name} is {len(value)} characters long; the limit is {MAX_SHORT}")
    if FORBIDDEN_TEXT_RE.search(value):
        raise InvalidAction(f"{name} contains {FORBIDDEN_TEXT}")
    return value


def _long(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidAction(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise InvalidAction(f"{name} is {len(value)} characters long; the limit is {MAX_TEXT}")
    if _TEXT_CONTROL_RE.search(value):
        raise InvalidAction(f"{name} contains control characters")
    return value


def audit_identifier(audit_schema: str) -> sql.Identifier:
    try:
        return sql.Identifier(check_schema_name(audit_schema))
    except SchemaError as exc:
        raise InvalidAction(str(exc)) from exc


def _record_plan(
    link: bool,
    verified: bool,
    name: str,
    status: str,
    verb: str | None,
    category: str | None,
    reason: str | None,
    comment: str | None,
    meta: Mapping[str, Any] | None,
    actor: ActorRef | str | Mapping[str, Any] | None,
    audit_schema: str,
) -> Plan[Action]:
    audit = audit_identifier(audit_schema)
    ctx = current()
    try:
        who = fields.check_actor(actor) if actor is not None else ctx.actor
    except InvalidActor as exc:
        raise InvalidAction(f"actor: {exc.problem}") from exc
    try:
        plain_meta = fields.check_mapping("meta", meta)
    except InvalidContext as exc:
        raise InvalidAction(f"meta {exc.problem}") from exc
    job_id = ctx.job.get("id") if ctx.job else None
    params: dict[str, Any] = {
        "name": _short("name", name, required=True),
        "status": _short("status", status, required=True),
        "verb": _short("verb", verb),
        "category": _short("category", category),
        "reason": _long("reason", reason),
        "comment": _long("comment", comment),
        "meta": None if plain_meta is None else Jsonb(plain_meta),
        "actor": None if who is None else Jsonb(who.to_dict()),
        "correlation_id": ctx.correlation_id,
        "request_id": ctx.request_id,
        "job_id": None if job_id is None else str(job_id),
    }
    insert = sql.SQL(
        "INSERT INTO {}.actions (name, actor, status, verb, category, reason, comment, correlation_id,"
        " request_id, job_id, meta) VALUES (%(name)s, %(actor)s, %(status)s, %(verb)s, %(category)s,"
        " %(reason)s, %(comment)s, %(correlation_id)s, %(request_id)s, %(job_id)s, %(meta)s)"
        " RETURNING " + _COLUMNS
    ).format(audit)
    if not link:
        rows = yield Query(insert, params)
        return Action.from_row(rows[0])
    if not verified:
        rows = yield Query(
            sql.SQL(
                "SELECT to_regprocedure(format('%%I.link_action(bigint)', %(schema)s::text)) IS NOT NULL AS ok"
            ),
            {"schema": audit_schema},
        )
        if not rows[0]["ok"]:
            raise SchemaError(
                f"audit schema {audit_schema!r} predates linked actions: run `threadline install` to upgrade it"
            )
    # link_action() (run as the schema's owner, so a least-privileged application role may call
    # it) links the current transaction's row, creating it if no audited write came yet: the
    # capture triggers then attach their changes to that row.
    rows = yield Query(
        sql.SQL("WITH a AS ({insert}) SELECT a.*, {audit}.link_action(a.id) AS transaction_id FROM a").format(
            insert=insert, audit=audit
        ),
        params,
    )
    return Action.from_row(rows[0])


# Connections (per audit schema) known to have link_action(): checked once, not on every call.
_verified: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _links(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the next statement runs in a transaction that goes on after it."""
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.INTRANS:
        return True
    return status == pq.TransactionStatus.IDLE and not conn.autocommit


def record_action(
    conn: ConnectionLike,
    name: str,
    *,
    status: str = "ok",
    verb: str | None = None,
    category: str | None = None,
    reason: str | None = None,
    comment: str | None = None,
    meta: Mapping[str, Any] | None = None,
    actor: ActorRef | str | Mapping[str, Any] | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> Action:
    """Record a semantic event ("order.refund" by admin:7 because "damaged in transit").

    ``actor`` defaults to the current context's actor; the correlation id, request id and job id
    always come from the current context. Called inside an open transaction (or on a connection
    that is not in autocommit mode) the transaction row links to the action; on an autocommit
    connection outside a transaction the action is written on its own.
    """
    raw, _ = native(conn)
    link = _links(raw)
    verified = audit_schema in _verified.get(raw, ())
    plan = _record_plan(
        link, verified, name, status, verb, category, reason, comment, meta, actor, audit_schema
    )
    action = run(conn, plan)
    if link:
        _verified.setdefault(raw, set()).add(audit_schema)
    return action


async def record_action_async(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    *,
    status: str = "ok",
    verb: str | None = None,
    category: str | None = None,
    reason: str | None = None,
    comment: str | None = None,
    meta: Mapping[str, Any] | None = None,
    actor: ActorRef | str | Mapping[str, Any] | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> Action:
    """Async twin of :func:`record_action`."""
    link = _links(conn)
    verified = audit_schema in _verified.get(conn, ())
    plan = _record_plan(
        link, verified, name, status, verb, category, reason, comment, meta, actor, audit_schema
    )
    action = await run_async(conn, plan)
    if link:
        _verified.setdefault(conn, set()).add(audit_schema)
    return action


def _list_plan(
    correlation_id: str | None,
    actor: ActorLike | None,
    name: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    audit_schema: str,
    after: int | None = None,
) -> Plan[list[Action]]:
    try:
        audit = sql.Identifier(check_schema_name(audit_schema))
    except SchemaError as exc:
        raise InvalidFilter(str(exc)) from exc
    correlation_id = check_text_filter("correlation_id", correlation_id)
    name = check_text_filter("name", name)
    who = check_actor(actor)
    since, until = check_window(since, until)
    checked = check_limit(limit, allow_none=False)
    params: dict[str, Any] = {"limit": checked}
    conds: list[sql.Composable] = []
    if correlation_id is not None:
        params["correlation_id"] = correlation_id
        conds.append(sql.SQL("correlation_id = %(correlation_id)s"))
    if name is not None:
        params["name"] = name
        conds.append(sql.SQL("name = %(name)s"))
    if who is not None:
        params["actor_type"] = who.type
        conds.append(sql.SQL("actor IS NOT NULL AND (actor ->> 'type') = %(actor_type)s"))
        if who.id is None:
            conds.append(sql.SQL("(actor ->> 'id') IS NULL"))
        else:
            params["actor_id"] = who.id
            conds.append(sql.SQL("(actor ->> 'id') = %(actor_id)s"))
    if since is not None:
        params["since"] = since
        conds.append(sql.SQL("inserted_at >= %(since)s"))
    if until is not None:
        params["until"] = until
        conds.append(sql.SQL("inserted_at < %(until)s"))
    if after is not None:
        if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after < 2**63:
            raise InvalidFilter(f"after must be the id of an action (a positive integer), got {after!r}")
        found = yield Query(
            sql.SQL("SELECT inserted_at FROM {}.actions WHERE id = %(id)s").format(audit), {"id": after}
        )
        if not found:
            raise InvalidFilter(f"after: there is no action {after} (purged since?): start again with since=")
        params.update(after_at=found[0]["inserted_at"], after_id=after)
        conds.append(sql.SQL("(inserted_at, id) > (%(after_at)s, %(after_id)s)"))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
    rows = yield Query(
        sql.SQL("SELECT " + _COLUMNS + " FROM {}.actions").format(audit)
        + where
        + sql.SQL(" ORDER BY inserted_at, id LIMIT %(limit)s"),
        params,
    )
    return [Action.from_row(r) for r in rows]


def list_actions(
    conn: ConnectionLike,
    *,
    correlation_id: str | None = None,
    actor: ActorLike | None = None,
    name: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    audit_schema: str = DEFAULT_SCHEMA,
    after: int | None = None,
) -> list[Action]:
    """Recorded actions, oldest first, filtered like :func:`threadline.timeline`:
    "which refunds did admin:7 issue this week?".

    ``after``: the id of the last action of the previous page; the page starts after it (in
    ``inserted_at``, then id, order), so actions recorded in one transaction, which share their
    time, page through as well. :class:`InvalidFilter` when no action has that id."""
    return run(conn, _list_plan(correlation_id, actor, name, since, until, limit, audit_schema, after))


async def list_actions_async(
    conn: psycopg.AsyncConnection[Any],
    *,
    correlation_id: str | None = None,
    actor: ActorLike | None = None,
    name: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    audit_schema: str = DEFAULT_SCHEMA,
    after: int | None = None,
) -> list[Action]:
    """Async twin of :func:`list_actions`."""
    return await run_async(
        conn, _list_plan(correlation_id, actor, name, since, until, limit, audit_schema, after)
    )
