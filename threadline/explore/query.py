"""Reading the audit trail: row history, what an actor did, the timeline of a request, the trace
tree, the changes of one transaction, and a row as it was at a given time.

Every function takes a psycopg 3 connection first (an ``..._async`` twin takes an
``AsyncConnection``), validates its arguments before touching the database (raising a
:class:`~threadline.core.errors.QueryError` subclass), binds every value as a parameter and returns
frozen records (:class:`~threadline.core.records.Change`, :class:`~threadline.core.records.Transaction`)
with UTC datetimes. ``audit_schema`` names the audit schema (default ``threadline``).

Time windows are half-open on the change's capture time: ``since <= captured_at < until``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from threadline.core._connection import ConnectionLike
from threadline.core._run import Plan, Query, Rows, run, run_async
from threadline.core.errors import (
    InvalidFilter,
)
from threadline.core.records import Action, Change, TaskRun, Transaction
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore.arguments import (
    ActorLike,
    audit_identifier,
    check_actor,
    check_limit,
    check_text_filter,
    check_window,
)
from threadline.explore.selection import (
    TRANSACTION_COLUMNS,
    Filters,
    _select,
    change_columns_sql,
    partitioned_plan,
    where_clause,
    with_transactions,
)
from threadline.explore.tables import key_condition, key_json, normalize_key, resolve_table
from threadline.explore.trace_build import build_trace
from threadline.explore.tracing import Trace

# ---------------------------------------------------------------------------------------------
# history


def _history_plan(table: str, pk: Any, limit: int | None, audit_schema: str) -> Plan[list[Change]]:
    audit = audit_identifier(audit_schema)
    limit = check_limit(limit, maximum=None)
    ref = yield from resolve_table(table, audit_schema)
    key = normalize_key(ref, pk)
    params: dict[str, Any] = {"pk": Jsonb(key, dumps=key_json)}
    partitioned = yield from partitioned_plan(audit_schema)
    statement = _select(audit, partitioned, join=False) + sql.SQL(
        " WHERE {} AND {} ORDER BY c.captured_at DESC, c.id DESC"
    ).format(key_condition("%(pk)s::jsonb"), ref.condition(params))
    if limit is not None:
        params["limit"] = limit
        statement += sql.SQL(" LIMIT %(limit)s")
    rows = yield Query(statement, params)
    return (yield from with_transactions(audit, rows))


def history(
    conn: ConnectionLike,
    table: str,
    pk: Any,
    *,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[Change]:
    """Every captured change of one row, newest first: "what happened to order 7?".

    ``table`` is ``[schema.]table`` (a dropped table still answers when its audit rows remain);
    ``pk`` is the key value for a single-column key (``7`` or ``"7"``), a dict for a composite
    key (``{"order_id": 7, "line_no": 2}``) or a tuple in key order. A table truncate is not a row
    change: find it with ``timeline(table=..., op="truncate")``. A key change is recorded under
    the new key (the old value is in that change's ``before``).
    """
    return run(conn, _history_plan(table, pk, limit, audit_schema))


async def history_async(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    pk: Any,
    *,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[Change]:
    """Async twin of :func:`history`."""
    return await run_async(conn, _history_plan(table, pk, limit, audit_schema))


# ---------------------------------------------------------------------------------------------
# actor_history


def _actor_history_plan(
    actor: ActorLike, since: datetime | None, until: datetime | None, limit: int | None, audit_schema: str
) -> Plan[list[Change]]:
    audit = audit_identifier(audit_schema)
    ref = check_actor(actor)
    if ref is None:
        raise InvalidFilter("actor is required")
    limit = check_limit(limit, maximum=None)
    since, until = check_window(since, until)
    filters = Filters(actor=ref, since=since, until=until)
    params: dict[str, Any] = {}
    partitioned = yield from partitioned_plan(audit_schema)
    statement = (
        _select(audit, partitioned)
        + where_clause(filters, params)
        + sql.SQL(" ORDER BY c.captured_at DESC, c.id DESC")
    )
    if limit is not None:
        params["limit"] = limit
        statement += sql.SQL(" LIMIT %(limit)s")
    rows = yield Query(statement, params)
    return (yield from with_transactions(audit, rows))


def actor_history(
    conn: ConnectionLike,
    actor: ActorLike,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[Change]:
    """Every change made under ``actor`` (``"user:42"`` or an :class:`ActorRef`) in
    ``[since, until)``, newest first: "what did user 42 change yesterday?"."""
    return run(conn, _actor_history_plan(actor, since, until, limit, audit_schema))


async def actor_history_async(
    conn: psycopg.AsyncConnection[Any],
    actor: ActorLike,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    limit: int | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[Change]:
    """Async twin of :func:`actor_history`."""
    return await run_async(conn, _actor_history_plan(actor, since, until, limit, audit_schema))


# ---------------------------------------------------------------------------------------------
# changes_for_transaction


def _transaction_plan(transaction_id: int, audit_schema: str) -> Plan[list[Change]]:
    audit = audit_identifier(audit_schema)
    if isinstance(transaction_id, bool) or not isinstance(transaction_id, int):
        raise InvalidFilter(f"transaction_id must be an integer, got {transaction_id!r}")
    partitioned = yield from partitioned_plan(audit_schema)
    rows = yield Query(
        _select(audit, partitioned, join=False) + sql.SQL(" WHERE c.transaction_id = %(tid)s ORDER BY c.id"),
        {"tid": transaction_id},
    )
    return (yield from with_transactions(audit, rows))


def changes_for_transaction(
    conn: ConnectionLike, transaction_id: int, *, audit_schema: str = DEFAULT_SCHEMA
) -> list[Change]:
    """The changes of one transaction, in capture order: "what else did that commit touch?"."""
    return run(conn, _transaction_plan(transaction_id, audit_schema))


async def changes_for_transaction_async(
    conn: psycopg.AsyncConnection[Any], transaction_id: int, *, audit_schema: str = DEFAULT_SCHEMA
) -> list[Change]:
    """Async twin of :func:`changes_for_transaction`."""
    return await run_async(conn, _transaction_plan(transaction_id, audit_schema))


# ---------------------------------------------------------------------------------------------
# trace

_ACTION_COLUMNS = sql.SQL(
    "a.id, a.name, a.actor, a.status, a.verb, a.category, a.reason, a.comment, a.correlation_id, "
    "a.request_id, a.job_id, a.meta, a.inserted_at"
)


def _trace_plan(correlation_id: str, audit_schema: str) -> Plan[Trace]:
    audit = audit_identifier(audit_schema)
    if correlation_id is None:
        raise InvalidFilter("correlation_id is required")
    checked = check_text_filter("correlation_id", correlation_id)
    params = {"correlation_id": checked}
    tx_rows = yield Query(
        sql.SQL(
            "SELECT {} FROM {}.transactions t WHERE t.correlation_id = %(correlation_id)s ORDER BY t.occurred_at, t.id"
        ).format(TRANSACTION_COLUMNS, audit),
        params,
    )
    # the changes of those transactions, by key (and, partitioned, start time: only their
    # partitions are read)
    partitioned = yield from partitioned_plan(audit_schema)
    change_rows: Rows = []
    if tx_rows:
        change_rows = yield Query(
            sql.SQL(
                "SELECT {}, c.transaction_id AS t_id FROM {}.changes c WHERE c.transaction_id = ANY (%(ids)s::bigint[]){}"
                " ORDER BY c.transaction_id, c.id"
            ).format(
                change_columns_sql(audit),
                audit,
                sql.SQL(" AND c.occurred_at = ANY (%(at)s::timestamptz[])" if partitioned else ""),
            ),
            {
                "ids": sorted({r["t_id"] for r in tx_rows}),
                "at": sorted({r["t_occurred_at"] for r in tx_rows}),
            },
        )
    action_rows = yield Query(
        sql.SQL(
            "SELECT {} FROM {}.actions a WHERE a.correlation_id = %(correlation_id)s ORDER BY a.inserted_at, a.id"
        ).format(_ACTION_COLUMNS, audit),
        params,
    )
    run_rows = yield Query(
        sql.SQL(
            "SELECT r.id, r.task_id, r.name, r.attempt, r.outcome, r.error, r.correlation_id, r.causation_id,"
            " r.parent_id, r.root_id, r.actor, r.worker, r.started_at, r.ended_at"
            " FROM {}.task_runs r WHERE r.correlation_id = %(correlation_id)s ORDER BY r.ended_at, r.id"
        ).format(audit),
        params,
    )
    transactions = [Transaction.from_row(r, "t_") for r in tx_rows]
    by_id = {t.id: t for t in transactions}
    changes = [Change.from_row(r, by_id.get(r["t_id"])) for r in change_rows]
    actions = [Action.from_row(r) for r in action_rows]
    runs = [TaskRun.from_row(r) for r in run_rows]
    return build_trace(checked or "", transactions, changes, actions, runs)


def trace(conn: ConnectionLike, correlation_id: str, *, audit_schema: str = DEFAULT_SCHEMA) -> Trace:
    """The story of one correlation id as a tree: request → tasks (by causation and Celery
    parent/root ids, retries grouped) → transactions → changes, with timings and actions.

    ``print(trace(conn, "req-1").render())`` shows it as text.
    """
    return run(conn, _trace_plan(correlation_id, audit_schema))


async def trace_async(
    conn: psycopg.AsyncConnection[Any], correlation_id: str, *, audit_schema: str = DEFAULT_SCHEMA
) -> Trace:
    """Async twin of :func:`trace`."""
    return await run_async(conn, _trace_plan(correlation_id, audit_schema))
