"""What a read of the audit trail selects and how it filters: the change and transaction columns
for either store layout, the join of a change to its transaction, :class:`Filters` and the WHERE
clause they make, and turning rows into :class:`~threadline.core.records.Change` records."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from threadline.core._run import Plan, Query, Rows
from threadline.core.actor import ActorRef
from threadline.core.records import Change, Transaction, iso
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.explore.arguments import (
    ActorLike,
    audit_identifier,
    check_actor,
    check_op,
    check_text_filter,
    check_window,
)
from threadline.explore.tables import TableRef, resolve_table

# ---------------------------------------------------------------------------------------------
# SQL pieces

# A json image may hold an escape the database cannot decode: \u0000, half a surrogate pair, or
# (in a database not in UTF-8) a character its encoding lacks. A json column's value is captured as
# its text, which PostgreSQL's json type accepts with such an escape, and every json function that
# reads the image's keys (json_each, ->, json_populate_record, the schema's changed_fields() and
# before_row()) then fails. Texts as E'' literals (the same whatever standard_conforming_strings
# says): \u (any escape), and in UTF-8 the only escapes that can fail there, \u0000 and a
# surrogate's half (\ud or \uD, which also finds some characters that decode).
_ANY_ESCAPE = r"E'\\u'"
_UTF8_SUSPECTS = (r"E'\\u0000'", r"E'\\ud'", r"E'\\uD'")


def may_hold_unreadable_escape(image: str) -> str:
    """SQL: whether the json (or jsonb) image ``image`` may hold an escape the database cannot
    decode (the cheap test, by the text alone, that leaves every other row alone)."""
    text = f"{image}::text"
    suspects = " OR ".join(f"strpos({text}, {s}) > 0" for s in _UTF8_SUSPECTS)
    return f"(strpos({text}, {_ANY_ESCAPE}) > 0 AND (getdatabaseencoding() <> 'UTF8' OR {suspects}))"


def has_unreadable_escape(image: str, audit: str) -> str:
    """SQL: whether the image ``image`` holds an escape the database cannot decode (the schema
    ``audit``'s ``json_unreadable()``, called only for an image that
    :func:`may_hold_unreadable_escape` picks)."""
    return f"({may_hold_unreadable_escape(image)} AND {audit}.json_unreadable({image}::json))"


def escapes_readable(image: str, audit: str) -> str:
    """SQL: the image ``image`` as json that json functions read whatever escapes it holds.

    Each escape the database cannot decode comes out as text (an escaped backslash before its
    ``uXXXX``) and each escaped backslash as two (the schema ``audit``'s
    ``json_escapes_readable(j, true)``): no two texts become the same, so values compared as
    rewritten text compare as they were. A key comes out with each backslash doubled
    (:data:`READABLE_KEY` undoes that; no column name holds an escape that cannot be decoded)."""
    return f"{audit}.json_escapes_readable({image}::json, true)"


READABLE_KEY = r"replace(b.key, E'\\\\', E'\\')"
"""SQL: the key ``b.key`` of an :func:`escapes_readable` image as it is in the image."""

# JSON columns come as text: Python parses them (one decoder call each, and a transaction's only
# once however many of its changes a result holds).
# An update's changed fields: stored for tables with masked columns (and by older releases),
# otherwise the keys whose values differ between its two whole-row images, in column order (the
# schema's changed_fields() function, inlined: the cast to json serves json and jsonb columns).
# An update whose images may hold an escape the database cannot decode (a json column's value with
# one) has them compared in the form escapes_readable() gives, each rewritten once (in a sub-select
# that OFFSET 0 keeps whole). That sub-plan has no sort nor join: the planner adds its estimated
# cost to every row's, and a higher estimate has JIT compile and optimize the statement at smaller
# sizes.
_CHANGED_FIELDS = (
    "CASE WHEN c.op = 'update' AND c.changed_fields IS NULL THEN"
    f" CASE WHEN {may_hold_unreadable_escape('c.before')} OR {may_hold_unreadable_escape('c.after')} THEN coalesce(("
    f"SELECT array_agg({READABLE_KEY} ORDER BY b.ord)"
    f" FROM (SELECT {escapes_readable('c.before', '{audit}')} AS bj, {escapes_readable('c.after', '{audit}')} AS aj"
    " OFFSET 0) AS s"
    " CROSS JOIN LATERAL json_each(s.bj) WITH ORDINALITY AS b(key, value, ord)"
    " WHERE (s.aj -> b.key)::text IS DISTINCT FROM b.value::text), ARRAY[]::text[])"
    " ELSE ARRAY("
    "SELECT b.key FROM json_each(c.before::json) WITH ORDINALITY AS b(key, value, ord)"
    " WHERE (c.after::json -> b.key)::text IS DISTINCT FROM b.value::text ORDER BY b.ord) END"
    " ELSE c.changed_fields END"
)


def changed_fields_sql(audit: sql.Identifier) -> sql.Composed:
    """SQL: a change's changed fields (``c`` a row of the schema ``audit``'s ``changes``)."""
    return sql.SQL(_CHANGED_FIELDS).format(audit=audit)


def change_columns_sql(audit: sql.Identifier) -> sql.Composed:
    """SQL: the change columns of :data:`CHANGE_COLUMN_NAMES` (``c`` a row of ``changes``)."""
    return sql.SQL(
        "c.id, c.transaction_id, c.table_schema, c.table_name, c.op, c.pk::text AS pk, "
        "c.after::text AS after, c.before::text AS before, {changed} AS changed_fields, c.captured_at"
    ).format(changed=changed_fields_sql(audit))


CHANGE_COLUMN_NAMES = (
    "id", "transaction_id", "table_schema", "table_name", "op", "pk", "after", "before", "changed_fields",
    "captured_at",
)  # fmt: skip
TRANSACTION_COLUMNS = sql.SQL(
    "t.id AS t_id, t.xid::text AS t_xid, t.occurred_at AS t_occurred_at, t.actor::text AS t_actor, "
    "t.correlation_id AS t_correlation_id, t.request_id AS t_request_id, "
    "t.causation_id AS t_causation_id, t.origin AS t_origin, t.job::text AS t_job, "
    "t.action_id AS t_action_id, t.meta::text AS t_meta, t.context_error AS t_context_error"
)
_LAYOUT = sql.SQL(
    "SELECT coalesce((SELECT c.relkind = 'p' FROM pg_class c"
    " WHERE c.oid = to_regclass(format('%%I.changes', %(schema)s::text))), false) AS partitioned"
)


def partitioned_plan(audit_schema: str) -> Plan[bool]:
    """Plan: whether the audit store is partitioned (asked once per connection)."""
    rows = yield Query(_LAYOUT, {"schema": audit_schema}, cache_key=f"partitioned {audit_schema}")
    return bool(rows and rows[0]["partitioned"])


def transaction_join(partitioned: bool) -> sql.SQL:
    """The condition that joins a change ``c`` to its transaction ``t``. In a partitioned store
    the start time they share is part of it, so only the partition that holds the transaction is
    searched (the id alone would search every partition)."""
    return sql.SQL(
        "t.id = c.transaction_id AND t.occurred_at = c.occurred_at"
        if partitioned
        else "t.id = c.transaction_id"
    )


def truncate_change_join(partitioned: bool) -> sql.SQL:
    """The condition that joins an entry ``x`` of ``truncates`` to its change ``c``, through the
    key of ``changes`` (in a partitioned store with the start time that picks the partition)."""
    return sql.SQL(
        "c.transaction_id = x.transaction_id AND c.id = x.change_id AND c.occurred_at = x.occurred_at"
        if partitioned
        else "c.transaction_id = x.transaction_id AND c.id = x.change_id"
    )


def change_columns(audit: sql.Identifier, partitioned: bool) -> tuple[sql.Composable, tuple[str, ...]]:
    """The change columns a query of the schema ``audit`` reads, and their names: in a
    partitioned store also the transaction's start time (``t_started``), so
    :func:`with_transactions` reads each transaction in its own partition."""
    columns = change_columns_sql(audit)
    if not partitioned:
        return columns, CHANGE_COLUMN_NAMES
    return columns + sql.SQL(", c.occurred_at AS t_started"), (*CHANGE_COLUMN_NAMES, "t_started")


# Changes are read without their transactions' columns (a transaction's context would otherwise
# travel and be decoded once per change); :func:`with_transactions` fetches each transaction once.
# The join is there for filters on the transaction: a plan without such filters leaves it out.
def _select(audit: sql.Identifier, partitioned: bool, *, join: bool = True) -> sql.Composed:
    """``SELECT`` of change columns from ``changes c``, joined to ``transactions t`` when ``join``
    (a filter reads the transaction)."""
    columns = change_columns(audit, partitioned)[0]
    if not join:
        return sql.SQL("SELECT {changes} FROM {audit}.changes c").format(changes=columns, audit=audit)
    return sql.SQL(
        "SELECT {changes} FROM {audit}.changes c LEFT JOIN {audit}.transactions t ON {join}"
    ).format(changes=columns, audit=audit, join=transaction_join(partitioned))


def changes_from_rows(rows: Rows, transactions: Mapping[int, Transaction] | None = None) -> list[Change]:
    """:class:`Change` records from rows of change columns; their transactions come from
    ``transactions`` (by id) or, when absent, from ``t_``-prefixed columns of the same rows."""
    if transactions is not None:
        return [Change.from_row(row, transactions.get(row["transaction_id"])) for row in rows]
    cache: dict[int, Transaction] = {}
    out: list[Change] = []
    for row in rows:
        tx: Transaction | None = None
        tid = row.get("t_id")
        if tid is not None:
            tx = cache.get(tid)
            if tx is None:
                tx = cache[tid] = Transaction.from_row(row, "t_")
        out.append(Change.from_row(row, tx))
    return out


def with_transactions(audit: sql.Identifier, rows: Rows) -> Plan[list[Change]]:
    """Plan: the changes of ``rows`` with their transactions, each read once (by id and start time
    when the rows carry ``t_started``: one partition each in a partitioned store)."""
    found: dict[int, Transaction] = {}
    if rows and "t_started" in rows[0]:
        # one lookup per transaction, by id and start time, each pruned to its own partition when
        # it runs (a LATERAL subquery with LIMIT: neither a hash join nor a parallel plan over
        # every partition, which the planner would cost lower than it turns out)
        pairs = sorted({(row["transaction_id"], row["t_started"]) for row in rows})
        tx_rows = yield Query(
            sql.SQL(
                "SELECT {} FROM unnest(%(ids)s::bigint[], %(at)s::timestamptz[]) AS k(id, at)"
                " CROSS JOIN LATERAL (SELECT * FROM {}.transactions x"
                "                      WHERE x.id = k.id AND x.occurred_at = k.at LIMIT 1) AS t"
            ).format(TRANSACTION_COLUMNS, audit),
            {"ids": [p[0] for p in pairs], "at": [p[1] for p in pairs]},
        )
        found = {r["t_id"]: Transaction.from_row(r, "t_") for r in tx_rows}
        return changes_from_rows(rows, found)
    ids = sorted({row["transaction_id"] for row in rows})
    if ids:
        tx_rows = yield Query(
            sql.SQL("SELECT {} FROM {}.transactions t WHERE t.id = ANY (%(ids)s::bigint[])").format(
                TRANSACTION_COLUMNS, audit
            ),
            {"ids": ids},
        )
        found = {r["t_id"]: Transaction.from_row(r, "t_") for r in tx_rows}
    return changes_from_rows(rows, found)


@dataclass(frozen=True)
class Filters:
    """Validated timeline/export filters (tables resolved)."""

    correlation_id: str | None = None
    table: TableRef | None = None
    actor: ActorRef | None = None
    op: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    partitioned: bool = False
    """The audit store is partitioned (how changes join their transactions; not a filter)."""

    @property
    def tx_join(self) -> sql.SQL:
        """The condition that joins ``c`` to ``t`` in this store (:func:`transaction_join`)."""
        return transaction_join(self.partitioned)

    @property
    def reads_transactions(self) -> bool:
        """Whether :func:`where_clause` reads the transaction ``t`` (else changes alone answer)."""
        return (
            self.correlation_id is not None
            or self.actor is not None
            or (self.until is not None and not self.partitioned)
        )

    def fingerprint(self) -> str:
        """Short hash of the identity filters (a cursor is bound to them)."""
        key = json.dumps(
            [
                self.correlation_id,
                None if self.table is None else [self.table.schema, self.table.name],
                None if self.actor is None else [self.actor.type, self.actor.id],
                self.op,
            ]
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """The filters as JSON-compatible values (for export headers and ``--json`` output)."""
        return {
            "correlation_id": self.correlation_id,
            "table": None if self.table is None else str(self.table),
            "actor": None if self.actor is None else str(self.actor),
            "op": self.op,
            "since": iso(self.since),
            "until": iso(self.until),
        }


def filters_plan(
    *,
    correlation_id: str | None = None,
    table: str | None = None,
    actor: ActorLike | None = None,
    op: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> Plan[Filters]:
    """Plan: validate timeline filters and resolve the table."""
    correlation_id = check_text_filter("correlation_id", correlation_id)
    actor_ref = check_actor(actor)
    op = check_op(op)
    since, until = check_window(since, until)
    audit_identifier(audit_schema)
    ref = None if table is None else (yield from resolve_table(table, audit_schema))
    partitioned = yield from partitioned_plan(audit_schema)
    return Filters(correlation_id, ref, actor_ref, op, since, until, partitioned)


def _actor_condition(actor: ActorRef, params: dict[str, Any]) -> sql.Composable:
    params["actor_type"] = actor.type
    if actor.id is None:
        return sql.SQL(
            "t.actor IS NOT NULL AND (t.actor ->> 'type') = %(actor_type)s AND (t.actor ->> 'id') IS NULL"
        )
    params["actor_id"] = actor.id
    return sql.SQL(
        "t.actor IS NOT NULL AND (t.actor ->> 'type') = %(actor_type)s AND (t.actor ->> 'id') = %(actor_id)s"
    )


def where_clause(
    filters: Filters, params: dict[str, Any], extra: Sequence[sql.Composable] = ()
) -> sql.Composable:
    """``WHERE ...`` for ``filters`` (and ``extra`` conditions) over ``changes c`` joined with
    ``transactions t``; the values go into ``params``."""
    conds: list[sql.Composable] = []
    if filters.correlation_id is not None:
        params["correlation_id"] = filters.correlation_id
        conds.append(sql.SQL("t.correlation_id = %(correlation_id)s"))
    if filters.table is not None:
        conds.append(filters.table.condition(params))
    if filters.actor is not None:
        conds.append(_actor_condition(filters.actor, params))
    if filters.op is not None:
        params["op"] = filters.op
        conds.append(sql.SQL("c.op = %(op)s"))
    if filters.since is not None:
        params["since"] = filters.since
        conds.append(sql.SQL("c.captured_at >= %(since)s"))
    if filters.until is not None:
        params["until"] = filters.until
        # a transaction starts before its changes are captured: this bound lets the actor and
        # time indexes of transactions help (partitioned: the partition key, which changes carry,
        # and the partitions after it are left out)
        conds.append(
            sql.SQL(
                "c.captured_at < %(until)s AND c.occurred_at < %(until)s"
                if filters.partitioned
                else "c.captured_at < %(until)s AND t.occurred_at < %(until)s"
            )
        )
    conds.extend(extra)
    if not conds:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)
