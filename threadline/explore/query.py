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

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from threadline.core import fields
from threadline.core._connection import ConnectionLike
from threadline.core._run import Plan, Query, Rows, run, run_async
from threadline.core.actor import ActorRef
from threadline.core.errors import (
    InvalidActor,
    InvalidContext,
    InvalidFilter,
    InvalidKey,
    SchemaError,
    TableNotFound,
    TrackingError,
)
from threadline.core.records import OPS, Action, Change, TaskRun, Transaction, iso, utc
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.triggers import parse_table_name
from threadline.explore.tracing import Trace, build_trace

MAX_LIMIT = 10_000
"""Largest page a :func:`timeline` call returns."""

ActorLike = ActorRef | str | Mapping[str, Any]
"""An actor filter: an :class:`ActorRef`, ``"type:id"`` text or an actor dict."""

# ---------------------------------------------------------------------------------------------
# Argument validation (shared with export, actions and the CLI)


def check_time(name: str, value: datetime | None) -> datetime | None:
    """A timezone-aware datetime converted to UTC; naive datetimes are refused."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidFilter(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise InvalidFilter(
            f"{name} is a naive datetime; give a timezone-aware one (e.g. datetime.now(timezone.utc))"
        )
    return utc(value)


def check_window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Validate a ``[since, until)`` window."""
    since, until = check_time("since", since), check_time("until", until)
    if since is not None and until is not None and since > until:
        raise InvalidFilter(f"since ({iso(since)}) is after until ({iso(until)})")
    return since, until


def check_limit(limit: int | None, *, maximum: int | None = MAX_LIMIT, allow_none: bool = True) -> int | None:
    """A positive integer limit (at most ``maximum``), or ``None`` for no limit when allowed."""
    if limit is None:
        if allow_none:
            return None
        raise InvalidFilter("limit is required")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidFilter(f"limit must be a positive integer, got {limit!r}")
    if maximum is not None and limit > maximum:
        raise InvalidFilter(f"limit {limit} is larger than {maximum}; page with the cursor instead")
    return limit


def check_op(op: str | None) -> str | None:
    """One of ``insert``, ``update``, ``delete``, ``truncate``."""
    if op is None:
        return None
    if op not in OPS:
        raise InvalidFilter(f"op {op!r} is not one of {', '.join(OPS)}")
    return op


def check_actor(actor: ActorLike | None) -> ActorRef | None:
    """An actor filter as an :class:`ActorRef` (``"user:42"`` text is parsed)."""
    try:
        return fields.check_actor(actor)
    except InvalidActor as exc:
        raise InvalidFilter(f"actor: {exc.problem}") from exc


def check_text_filter(name: str, value: str | None) -> str | None:
    """A non-empty id filter (correlation id, request id...)."""
    if value is None:
        return None
    try:
        return fields.check_text(name, value)
    except InvalidContext as exc:
        raise InvalidFilter(f"{name} {exc.problem}") from exc


def _audit(audit_schema: str) -> sql.Identifier:
    try:
        return sql.Identifier(check_schema_name(audit_schema))
    except SchemaError as exc:
        raise InvalidFilter(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Tables and keys


@dataclass(frozen=True)
class TableRef:
    """A table named in a query, resolved to its schema, with what is known about its key."""

    schema: str
    name: str
    keys: tuple[str, ...] | None
    """Key columns in order (from the capture configuration, else the primary key, else the
    audit data); ``None`` when unknown."""
    key_kinds: Mapping[str, str] = field(default_factory=dict)
    in_catalog: bool = True
    """False for a table that is gone from the database but still in the audit data."""
    names: tuple[tuple[str, str, str | None, str | None], ...] = ()
    """Every ``(schema, name, from, until)`` its changes were recorded under (it may have been
    renamed; a name another tracked table had too counts only between those times, as text);
    empty means just its own name."""

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    def condition(self, params: dict[str, Any], alias: str = "c") -> sql.Composable:
        """``alias`` rows of this table under any of its names; the values go into ``params``."""
        names = self.names or ((self.schema, self.name, None, None),)
        a = sql.Identifier(alias)
        if len(names) == 1 and names[0][2] is None and names[0][3] is None:
            params["table_schema"], params["table_name"] = names[0][:2]
            return sql.SQL("{a}.table_schema = %(table_schema)s AND {a}.table_name = %(table_name)s").format(
                a=a
            )
        parts: list[sql.Composable] = []
        for i, (schema, name, valid_from, valid_until) in enumerate(names):
            params[f"tbl_s{i}"], params[f"tbl_n{i}"] = schema, name
            part = sql.SQL("{a}.table_schema = {s} AND {a}.table_name = {n}").format(
                a=a, s=sql.Placeholder(f"tbl_s{i}"), n=sql.Placeholder(f"tbl_n{i}")
            )
            if valid_from is not None:
                params[f"tbl_f{i}"] = valid_from
                part = sql.SQL("{} AND {}.captured_at >= {}::timestamptz").format(
                    part, a, sql.Placeholder(f"tbl_f{i}")
                )
            if valid_until is not None:
                params[f"tbl_u{i}"] = valid_until
                part = sql.SQL("{} AND {}.captured_at < {}::timestamptz").format(
                    part, a, sql.Placeholder(f"tbl_u{i}")
                )
            parts.append(sql.SQL("({})").format(part))
        return sql.SQL("({})").format(sql.SQL(" OR ").join(parts))


_CATALOG_SQL = """
SELECT n.nspname::text AS schema, c.relname::text AS name,
       (SELECT t.key_columns FROM {audit}.tracked_tables t WHERE t.relid = c.oid) AS capture_keys,
       ARRAY(SELECT ARRAY[x.table_schema, x.table_name, x.valid_from::text, x.valid_until::text]
               FROM {audit}.table_names(n.nspname::text, c.relname::text) x) AS names,
       ARRAY(SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = c.oid AND i.indisprimary
              ORDER BY k.ord) AS primary_key,
       (SELECT jsonb_object_agg(a.attname, (SELECT jsonb_build_array(ty.typname, ty.typcategory)
                                              FROM pg_type ty WHERE ty.oid = a.atttypid))
          FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS column_types
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relname = %(name)s::name AND c.relkind IN ('r', 'p')
   AND (n.nspname = %(schema)s::name
        OR (%(schema)s::name IS NULL AND n.nspname = ANY (current_schemas(false))))
 ORDER BY array_position(current_schemas(false), n.nspname) NULLS LAST
 LIMIT 1
"""

_AUDIT_TABLE_SQL = """
SELECT c.table_schema AS schema, c.table_name AS name, c.pk,
       ARRAY(SELECT ARRAY[x.table_schema, x.table_name, x.valid_from::text, x.valid_until::text]
               FROM {audit}.table_names(c.table_schema, c.table_name) x) AS names
  FROM {audit}.changes c
 WHERE c.table_name = %(name)s
   AND (c.table_schema = %(schema)s::text
        OR (%(schema)s::text IS NULL AND c.table_schema = ANY (current_schemas(false))))
 LIMIT 1
"""


def _kind(typname: str, category: str) -> str:
    if typname in ("int2", "int4", "int8"):
        return "int"
    if typname in ("uuid", "bool"):
        return typname
    if category == "N":
        return "number"
    if category == "S":
        return "text"
    return "other"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    return "other"


def resolve_table(table: str, audit_schema: str = DEFAULT_SCHEMA) -> Plan[TableRef]:
    """Plan: find ``[schema.]table`` in the catalog (search path when unqualified), else in the
    audit data (a dropped table's history stays readable); :class:`TableNotFound` otherwise."""
    audit = _audit(audit_schema)
    if not isinstance(table, str):
        raise TableNotFound(f"table must be a name like 'orders' or 'public.orders', got {table!r}")
    try:
        table_schema, table_name = parse_table_name(table)
    except TrackingError as exc:
        raise TableNotFound(str(exc)) from exc
    params = {"name": table_name, "schema": table_schema, "audit": audit_schema}
    rows = yield Query(sql.SQL(_CATALOG_SQL).format(audit=audit), params)
    if rows:
        row = rows[0]
        keys: tuple[str, ...] | None = tuple(row["capture_keys"] or ()) or None
        if keys is None and row["primary_key"]:
            keys = tuple(row["primary_key"])
        types = row["column_types"] or {}
        kinds = {k: _kind(*types[k]) for k in keys or () if k in types}
        return TableRef(row["schema"], row["name"], keys, kinds, True, _names(row["names"]))
    rows = yield Query(sql.SQL(_AUDIT_TABLE_SQL).format(audit=audit), params)
    if not rows:
        shown = table_name if table_schema is None else f"{table_schema}.{table_name}"
        where = "on the search path" if table_schema is None else f"in schema {table_schema!r}"
        raise TableNotFound(f"table {shown!r} does not exist {where} and has no audit rows")
    row = rows[0]
    pk = row["pk"] if isinstance(row["pk"], dict) else None
    keys = tuple(pk) if pk else None
    kinds = {k: _json_kind(v) for k, v in (pk or {}).items()}
    return TableRef(row["schema"], row["name"], keys, kinds, False, _names(row["names"]))


def _names(rows: Any) -> tuple[tuple[str, str, str | None, str | None], ...]:
    return tuple(sorted(((str(r[0]), str(r[1]), r[2], r[3]) for r in rows or ()), key=lambda n: n[:2]))


_INT_RE = re.compile(r"^[+-]?\d+$")


def _coerce(table: TableRef, column: str, value: Any) -> Any:
    kind = table.key_kinds.get(column, "other")
    where = f"key column {column!r} of {table}"
    if value is None:
        raise InvalidKey(f"{where}: a key value cannot be None")
    if isinstance(value, bool) and kind != "bool":
        raise InvalidKey(f"{where}: got a bool, expected a {kind} value")
    try:
        if kind == "int":
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str) and _INT_RE.match(value.strip()):
                return int(value)
            raise ValueError
        if kind == "number":
            if isinstance(value, (int, float)) and math.isfinite(value):
                return value
            if isinstance(value, str):
                text = value.strip()
                if _INT_RE.match(text):
                    return int(text)
                number = float(text)
                if math.isfinite(number):
                    return number
            raise ValueError
        if kind == "uuid":
            return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "t", "f"):
                return value.lower() in ("true", "t")
            raise ValueError
        if kind == "text":
            if isinstance(value, (str, int)):
                return str(value)
            raise ValueError
    except ValueError:
        raise InvalidKey(f"{where}: {value!r} is not a valid {kind} value") from None
    if isinstance(value, (str, int, float)):
        return value
    raise InvalidKey(f"{where}: {type(value).__name__} values are not supported; give the JSON form")


def normalize_key(table: TableRef, pk: Any) -> dict[str, Any]:
    """The ``pk`` jsonb a change of this row carries, from a scalar (single-column keys), a tuple
    in key order or a dict (composite keys); values are converted to the key columns' types."""
    keys = table.keys
    if isinstance(pk, Mapping):
        given = dict(pk)
        if not given or not all(isinstance(k, str) for k in given):
            raise InvalidKey(f"pk for {table} must map key column names to values, got {pk!r}")
        if keys is not None and set(given) != set(keys):
            raise InvalidKey(f"{table} is keyed by ({', '.join(keys)}); got key columns ({', '.join(given)})")
        order: Sequence[str] = keys or tuple(given)
    elif isinstance(pk, (tuple, list)):
        if keys is None:
            raise InvalidKey(f"the key columns of {table} are unknown: give pk as a dict")
        if len(pk) != len(keys):
            raise InvalidKey(f"{table} is keyed by ({', '.join(keys)}); got {len(pk)} value(s)")
        given = dict(zip(keys, pk, strict=True))
        order = keys
    else:
        if keys is None:
            raise InvalidKey(f"the key columns of {table} are unknown: give pk as a dict")
        if len(keys) != 1:
            raise InvalidKey(f"{table} has a composite key ({', '.join(keys)}): give pk as a dict or a tuple")
        given = {keys[0]: pk}
        order = keys
    return {k: _coerce(table, k, given[k]) for k in order}


# ---------------------------------------------------------------------------------------------
# SQL pieces

# JSON columns come as text: Python parses them (one decoder call each, and a transaction's only
# once however many of its changes a result holds).
# An update's changed fields: stored for tables with masked columns (and by older releases),
# otherwise the keys whose values differ between its two whole-row images, in column order (the
# schema's changed_fields() function, inlined: the cast to json serves json and jsonb columns).
CHANGED_FIELDS_SQL = (
    "CASE WHEN c.op = 'update' AND c.changed_fields IS NULL THEN ARRAY("
    "SELECT b.key FROM json_each(c.before::json) WITH ORDINALITY AS b(key, value, ord)"
    " WHERE (c.after::json -> b.key)::text IS DISTINCT FROM b.value::text ORDER BY b.ord)"
    " ELSE c.changed_fields END"
)
CHANGE_COLUMNS = sql.SQL(
    "c.id, c.transaction_id, c.table_schema, c.table_name, c.op, c.pk::text AS pk, "
    "c.after::text AS after, c.before::text AS before, "
    + CHANGED_FIELDS_SQL
    + " AS changed_fields, c.captured_at"
)
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


def change_columns(partitioned: bool) -> tuple[sql.Composable, tuple[str, ...]]:
    """The change columns a query reads, and their names: in a partitioned store also the
    transaction's start time (``t_started``), so :func:`with_transactions` reads each transaction
    in its own partition."""
    if not partitioned:
        return CHANGE_COLUMNS, CHANGE_COLUMN_NAMES
    return CHANGE_COLUMNS + sql.SQL(", c.occurred_at AS t_started"), (*CHANGE_COLUMN_NAMES, "t_started")


# Changes are read without their transactions' columns (a transaction's context would otherwise
# travel and be decoded once per change); :func:`with_transactions` fetches each transaction once.
# The join is there for filters on the transaction: a plan without such filters leaves it out.
def _select(audit: sql.Identifier, partitioned: bool, *, join: bool = True) -> sql.Composed:
    """``SELECT`` of change columns from ``changes c``, joined to ``transactions t`` when ``join``
    (a filter reads the transaction)."""
    columns = change_columns(partitioned)[0]
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
    _audit(audit_schema)
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


# ---------------------------------------------------------------------------------------------
# history


def _history_plan(table: str, pk: Any, limit: int | None, audit_schema: str) -> Plan[list[Change]]:
    audit = _audit(audit_schema)
    limit = check_limit(limit, maximum=None)
    ref = yield from resolve_table(table, audit_schema)
    key = normalize_key(ref, pk)
    params: dict[str, Any] = {"pk": Jsonb(key)}
    partitioned = yield from partitioned_plan(audit_schema)
    statement = _select(audit, partitioned, join=False) + sql.SQL(
        " WHERE c.pk = %(pk)s AND {} ORDER BY c.captured_at DESC, c.id DESC"
    ).format(ref.condition(params))
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
    audit = _audit(audit_schema)
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
    audit = _audit(audit_schema)
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
    audit = _audit(audit_schema)
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
                CHANGE_COLUMNS,
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
