"""Application tables as the readers see them: :class:`TableRef` (resolved through the catalog and
the tracking registry, also for a table that is gone) and a row key normalised to its columns' types."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from psycopg import sql

from threadline.core._run import Plan, Query
from threadline.core.errors import (
    InvalidKey,
    TableNotFound,
    TrackingError,
)
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.ddl.registry import parse_table_name
from threadline.explore.arguments import audit_identifier

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


def key_condition(key: str, alias: str = "c") -> sql.Composable:
    """``alias`` rows whose key is ``key`` (a SQL expression of type jsonb, such as ``%(pk)s``),
    in the form the key index of ``changes`` (a btree on ``jsonb_hash(pk)``) serves: the hashes
    first, then the keys themselves, since two keys may share a hash."""
    a = sql.Identifier(alias)
    value = sql.SQL(key)
    return sql.SQL("pg_catalog.jsonb_hash({a}.pk) = pg_catalog.jsonb_hash({v}) AND {a}.pk = {v}").format(
        a=a, v=value
    )


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
       (SELECT jsonb_object_agg(a.attname, (SELECT jsonb_build_array(ty.typname, ty.typcategory, a.atttypmod)
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
 WHERE c.table_name = %(name)s AND c.pk IS NOT NULL
   AND (c.table_schema = %(schema)s::text
        OR (%(schema)s::text IS NULL AND c.table_schema = ANY (current_schemas(false))))
 LIMIT 1
"""


def _kind(typname: str, category: str, typmod: int = -1) -> str:
    if typname == "bpchar" and typmod > 4:
        return f"char:{typmod - 4}"  # char(n): compared padded to n
    if typname in ("int2", "int4", "int8"):
        return "int"
    if typname in ("uuid", "bool", "timestamptz"):
        return typname
    if typname in ("oid", "money") or (category == "N" and typname.startswith("reg")):
        return "text"  # numeric types, which JSON writes as strings
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
    audit = audit_identifier(audit_schema)
    if not isinstance(table, str) or "\x00" in table:
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
_INT8 = 2**63


def _coerce(table: TableRef, column: str, value: Any) -> Any:
    kind = table.key_kinds.get(column, "other")
    where = f"key column {column!r} of {table}"
    if value is None:
        raise InvalidKey(f"{where}: a key value cannot be None")
    if isinstance(value, bool) and kind != "bool":
        raise InvalidKey(f"{where}: got a bool, expected a {kind} value")
    if isinstance(value, str) and "\x00" in value:
        raise InvalidKey(f"{where}: a key value cannot hold NUL (\\x00), which PostgreSQL text cannot store")
    try:
        if kind == "int":
            integral_float = isinstance(value, float) and value.is_integer()
            if integral_float or (
                isinstance(value, str) and _INT_RE.match(value.strip()) and len(value) < 40
            ):
                value = int(value)
            if not isinstance(value, int):
                raise ValueError(value)
            if not -_INT8 <= value < _INT8:
                raise InvalidKey(
                    f"{where}: {_shown(value)} is not a valid int value (beyond the range of bigint)"
                )
            return value
        if kind == "number":
            return _number(value)
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
        if kind == "timestamptz":
            return _utc_text(value)
        if kind.startswith("char:"):
            width = int(kind[5:])
            text = str(value).rstrip(" ") if isinstance(value, (str, int)) else None
            if text is None or len(text) > width:
                raise InvalidKey(f"{where}: expected text of at most {width} characters (char({width}))")
            return text.ljust(width)
    except InvalidKey:
        raise
    except ValueError:
        raise InvalidKey(f"{where}: {_shown(value)} is not a valid {kind} value") from None
    if isinstance(value, (str, int, float)):
        return value
    raise InvalidKey(f"{where}: {type(value).__name__} values are not supported; give the JSON form")


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or -_BIG_INT < value < _BIG_INT else "a very large int"
    return text if len(text) <= 80 else text[:79] + "…"


_SHORT_OFFSET = re.compile(r"[+-]\d\d$")


def _utc_text(value: Any) -> str:
    """A ``timestamptz`` key value as capture writes it (in UTC, as ``to_json()`` prints it:
    ``2024-05-01T12:00:00.5+00:00``), from an aware ``datetime`` or its ISO 8601 text."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("infinity", "-infinity"):
            return text.lower()
        text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        text = text + ":00" if _SHORT_OFFSET.search(text) else text
        value = datetime.fromisoformat(text)  # ValueError: not a time
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(value)
    try:
        at = value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(value) from None
    fraction = f".{at.microsecond:06d}".rstrip("0") if at.microsecond else ""
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:{at.second:02d}"
        f"{fraction}+00:00"
    )


_INT_DIGITS = 4000
_BIG_INT = 10**_INT_DIGITS


def _number(value: Any) -> int | float | Decimal | str:
    """A number key value as a change's ``pk`` holds it: an ``int`` or ``float`` as it is, a
    ``Decimal`` (or a numeric string) exactly, and NaN or an infinity as the text PostgreSQL writes
    for a non-finite ``numeric``, ``float8`` or ``real`` (``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``); :class:`ValueError` for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if _INT_RE.match(text) and len(text) < _INT_DIGITS:
            return int(text)
        try:
            value = Decimal(text)
        except ArithmeticError:
            raise ValueError(text) from None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValueError(value)
    if isinstance(value, int):
        # past Python's limit on the digits of an int written as text: exactly, as a Decimal
        return value if -_BIG_INT < value < _BIG_INT else Decimal(value)
    # a Decimal beyond float's range is finite: ask it, not math (which converts it to a float)
    if value.is_nan() if isinstance(value, Decimal) else math.isnan(value):
        return "NaN"
    if value.is_infinite() if isinstance(value, Decimal) else math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def key_json(key: Mapping[str, Any]) -> str:
    """``key`` (from :func:`normalize_key`) as JSON text, a ``Decimal`` written with all its digits
    (for psycopg's ``Jsonb(key, dumps=key_json)``)."""
    return (
        "{"
        + ",".join(
            json.dumps(k) + ":" + (str(v) if isinstance(v, Decimal) else json.dumps(v))
            for k, v in key.items()
        )
        + "}"
    )


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
