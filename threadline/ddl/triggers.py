"""Per-table capture, driven by the registry in the audit schema.

The audit schema holds the one generator of capture code and the one record of what each table is
tracked with (``tracked_tables``): its SQL functions ``track()``, ``untrack()``, ``sync()`` and
``tracking_status()`` are what migrations in any framework call, and the functions here call the
same ones, so Python, the CLI and SQL migrations produce identical capture code. Options persist:
tracking a table again without options regenerates its code with the stored ones, and only
``unmask``/``include`` reveal a masked or excluded column again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import psycopg
from psycopg import sql

from threadline.core.errors import (
    InvalidTrackOption,
    NoPrimaryKey,
    TrackingError,
    UnknownColumn,
    UnknownTable,
)
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.registry import SyncAction, TrackedTable, TrackResult, parse_table_name
from threadline.ddl.schema import require_installed

logger = logging.getLogger("threadline.ddl")


def _resolve(conn: psycopg.Connection, table: str, schema: str | None) -> tuple[str, str, str]:
    """(schema, name, relkind) of an existing table, or :class:`UnknownTable`."""
    if schema is None:
        row = conn.execute(
            """
            SELECT n.nspname, c.relname, c.relkind
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = %s AND n.nspname = ANY (current_schemas(false))
             ORDER BY array_position(current_schemas(false), n.nspname)
             LIMIT 1
            """,
            [table],
        ).fetchone()
    else:
        row = conn.execute(
            """
            SELECT n.nspname, c.relname, c.relkind
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = %s AND n.nspname = %s
            """,
            [table, schema],
        ).fetchone()
    shown = table if schema is None else f"{schema}.{table}"
    if row is None:
        where = "on the search path" if schema is None else f"in schema {schema!r}"
        raise UnknownTable(f"table {shown!r} does not exist {where}")
    if row[2] not in ("r", "p"):
        raise UnknownTable(f"{shown!r} is not a table (only plain and partitioned tables can be tracked)")
    return row[0], row[1], row[2]


def _names(values: Iterable[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out: list[str] = []
    for v in values:
        v = v.strip() if isinstance(v, str) else v
        if not isinstance(v, str) or not v:
            raise InvalidTrackOption(f"column names must be non-empty strings, got {v!r}")
        if "\x00" in v:
            raise InvalidTrackOption(f"column name {v!r} contains a NUL character")
        if v not in out:
            out.append(v)
    return out


def _error(exc: psycopg.Error) -> TrackingError | None:
    """The tracking error for an error the audit schema's SQL API raises on purpose; ``None`` for
    any other database error (a read-only transaction, a lock timeout...), which stays as it is."""
    diag = exc.diag
    text = (diag.message_primary or str(exc)).removeprefix("threadline: ")
    if diag.message_hint:
        text += f" ({diag.message_hint})"
    cls: type[TrackingError] | None = {
        "42703": UnknownColumn,
        "22023": InvalidTrackOption,
        "42809": UnknownTable,
        "TL001": NoPrimaryKey,
    }.get(diag.sqlstate or "")
    if cls is None and (diag.message_primary or "").startswith("threadline: "):
        cls = TrackingError  # raised on purpose, with a code of its own
    return None if cls is None else cls(text)


def _table_literal(schema: str | None, table: str) -> sql.Composable:
    """``'"schema"."table"'``: a text that casts to the table's regclass, quoted so any name works."""
    ident = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
    return sql.Literal(ident.as_string(None))


def _api_call(
    function: str, audit_schema: str, table: sql.Composable, options: dict[str, object]
) -> sql.Composed:
    args: list[sql.Composable] = [table]
    for name, value in options.items():
        if value is None or value is False:
            continue
        lit: sql.Composable
        if not isinstance(value, list):
            lit = sql.Literal(value)
        elif value:
            lit = sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(sql.Literal(v) for v in value))
        else:
            lit = sql.SQL("'{}'::text[]")
        args.append(sql.SQL("{} => {}").format(sql.SQL(name), lit))
    return sql.SQL("SELECT * FROM {}.{}({})").format(
        sql.Identifier(audit_schema), sql.SQL(function), sql.SQL(", ").join(args)
    )


def _track_options(
    keys: Iterable[str] | str | None,
    exclude: Iterable[str] | str | None,
    mask: Iterable[str] | str | None,
    unmask: Iterable[str] | str | None,
    include: Iterable[str] | str | None,
    strict: bool,
) -> dict[str, object]:
    """The SQL API's ``track()`` arguments, validated (the order is the statement's)."""
    return {
        "keys": _names(keys),
        "exclude": _names(exclude),
        "mask": _names(mask),
        "unmask": _names(unmask),
        "include": _names(include),
        "strict": strict,
    }


def _split(table: str, schema: str | None) -> tuple[str | None, str]:
    return parse_table_name(table) if schema is None else (schema, table)


# ---------------------------------------------------------------------------------------------
# Public operations


def track_sql(
    table: str,
    *,
    table_schema: str | None = None,
    exclude: Iterable[str] | str | None = None,
    mask: Iterable[str] | str | None = None,
    keys: Iterable[str] | str | None = None,
    unmask: Iterable[str] | str | None = None,
    include: Iterable[str] | str | None = None,
    strict: bool = False,
    audit_schema: str = DEFAULT_SCHEMA,
) -> str:
    """The SQL-API statement :func:`track` runs, for a migration (no database needed).

    Deterministic; an unqualified name is resolved on the search path when the statement runs.
    """
    check_schema_name(audit_schema)
    table_schema, table_name = _split(table, table_schema)
    options = _track_options(keys, exclude, mask, unmask, include, strict)
    return (
        _api_call("track", audit_schema, _table_literal(table_schema, table_name), options).as_string(None)
        + ";\n"
    )


def track(
    conn: psycopg.Connection,
    table: str,
    *,
    table_schema: str | None = None,
    exclude: Iterable[str] | str | None = None,
    mask: Iterable[str] | str | None = None,
    keys: Iterable[str] | str | None = None,
    unmask: Iterable[str] | str | None = None,
    include: Iterable[str] | str | None = None,
    strict: bool = False,
    audit_schema: str = DEFAULT_SCHEMA,
) -> TrackResult:
    """Track ``table``, or regenerate its capture code, in one transaction. Idempotent.

    Options left ``None`` keep what is stored for the table: ``exclude`` and ``mask`` add
    columns, ``unmask`` and ``include`` remove them (nothing else ever reveals a column again),
    ``keys`` replaces the key columns (an empty list: the primary key). ``strict`` refuses a
    column whose name looks secret and that is neither masked nor excluded; otherwise such
    columns are logged as a warning and listed in :attr:`TrackResult.unprotected`.
    """
    require_installed(conn, audit_schema)
    table_schema, table_name = _split(table, table_schema)
    options = _track_options(keys, exclude, mask, unmask, include, strict)
    with conn.transaction():
        rel_schema, rel_name, _ = _resolve(conn, table_name, table_schema)
        statement = _api_call("track", audit_schema, _table_literal(rel_schema, rel_name), options)
        try:
            row = conn.execute(statement).fetchone()
        except psycopg.Error as exc:
            mapped = _error(exc)
            if mapped is None:
                raise
            raise mapped from None
    assert row is not None
    result = TrackResult(
        table_schema=row[0],
        table_name=row[1],
        action=row[2],
        keys=tuple(row[3]),
        exclude=tuple(row[4]),
        mask=tuple(row[5]),
        previous_keys=None if row[6] is None else tuple(row[6]),
        previous_exclude=None if row[7] is None else tuple(row[7]),
        previous_mask=None if row[8] is None else tuple(row[8]),
        unprotected=tuple(row[9] or ()),
        mode=row[10],
        keys_unique=_keys_unique(conn, rel_schema, rel_name, tuple(row[3])),
    )
    if result.unprotected:
        logger.warning(
            "%s.%s: column(s) %s look secret and are neither masked nor excluded",
            result.table_schema,
            result.table_name,
            ", ".join(result.unprotected),
        )
    if not result.keys_unique:
        logger.warning(
            "%s.%s: no unique index or primary key covers the key column(s) %s (an index over columns"
            " that may be NULL does not): rows that share a key share a history, and revert refuses them",
            result.table_schema,
            result.table_name,
            ", ".join(result.keys),
        )
    return result


def _keys_unique(conn: psycopg.Connection, schema: str, name: str, keys: tuple[str, ...]) -> bool:
    """True when a unique index (or the primary key) without predicate covers columns among ``keys``,
    all of them ``NOT NULL`` (a unique index holds any number of rows whose key holds a NULL)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i"
        " WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND i.indisunique"
        "   AND i.indpred IS NULL AND i.indexprs IS NULL"
        "   AND ARRAY(SELECT a.attname::text FROM pg_attribute a"
        "              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])) <@ %s::text[]"
        "   AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid"
        "                      AND a.attnum = ANY (i.indkey::int2[]) AND NOT a.attnotnull))",
        [schema, name, list(keys)],
    ).fetchone()
    return bool(row and row[0])


def untrack_sql(
    table: str, *, table_schema: str | None = None, audit_schema: str = DEFAULT_SCHEMA, forget: bool = False
) -> str:
    """The SQL-API statement :func:`untrack` runs, for a migration (no database needed)."""
    check_schema_name(audit_schema)
    table_schema, table_name = _split(table, table_schema)
    call = _api_call("untrack", audit_schema, _table_literal(table_schema, table_name), {"forget": forget})
    return call.as_string(None) + ";\n"


def untrack(
    conn: psycopg.Connection,
    table: str,
    *,
    table_schema: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
    forget: bool = False,
) -> bool:
    """Remove capture from ``table`` (audit rows stay); returns False if it was not tracked.

    The table's masks and excludes are kept: tracking it again (under any name) hides the same
    columns, as :func:`kept_options` shows. ``forget=True`` drops them, and those that a dropped
    tracked table of its name left. A table that is gone (dropped) but still registered is cleaned
    up by its last name; a name the table no longer has is refused, naming where the table went.
    """
    require_installed(conn, audit_schema)
    table_schema, table_name = _split(table, table_schema)
    with conn.transaction():
        try:
            rel_schema, rel_name, _ = _resolve(conn, table_name, table_schema)
        except UnknownTable:
            return _untrack_gone(conn, table_schema, table_name, audit_schema)
        row = conn.execute(
            _api_call("untrack", audit_schema, _table_literal(rel_schema, rel_name), {"forget": forget})
        ).fetchone()
    return bool(row and row[0])


def kept_options(
    conn: psycopg.Connection,
    table: str,
    *,
    table_schema: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> tuple[list[str], list[str]]:
    """The masks and excludes that tracking the untracked ``table`` would take on (``([], [])``
    for none): its own, kept when it was untracked, or those of a dropped tracked table of its
    name."""
    check_schema_name(audit_schema)
    table_schema, table_name = _split(table, table_schema)
    rel_schema, rel_name, _ = _resolve(conn, table_name, table_schema)
    row = conn.execute(
        sql.SQL(
            "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            "            WHERE n.nspname = %(schema)s AND c.relname = %(name)s)"
            " SELECT d.mask, d.exclude FROM {}.dropped_tables d, t"
            "  WHERE (d.relid = t.oid AND d.untracked) OR (d.table_schema, d.table_name) = (%(schema)s, %(name)s)"
            "  ORDER BY (d.relid = t.oid AND d.untracked) DESC LIMIT 1"
        ).format(sql.Identifier(audit_schema)),
        {"schema": rel_schema, "name": rel_name},
    ).fetchone()
    return (list(row[0]), list(row[1])) if row else ([], [])


def _untrack_gone(
    conn: psycopg.Connection, table_schema: str | None, table_name: str, audit_schema: str
) -> bool:
    found = conn.execute(
        sql.SQL(
            "SELECT s.tracked_id, s.table_schema, s.table_name, s.status, s.function_name"
            "  FROM {audit}.tracking_status() s"
            "  JOIN {audit}.tracked_table_names n ON n.tracked_id = s.tracked_id"
            " WHERE n.table_name = %(name)s"
            "   AND (n.table_schema = %(schema)s OR (%(schema)s::text IS NULL"
            "        AND n.table_schema = ANY (current_schemas(false))))"
            " ORDER BY s.tracked_id"
        ).format(audit=sql.Identifier(audit_schema)),
        {"name": table_name, "schema": table_schema},
    ).fetchall()
    shown = table_name if table_schema is None else f"{table_schema}.{table_name}"
    if not found:
        raise UnknownTable(f"table {shown!r} does not exist and is not registered as tracked")
    live = [r for r in found if r[3] != "orphaned"]
    if live:
        raise UnknownTable(
            f"table {shown!r} was renamed to {live[0][1]}.{live[0][2]}: untrack it by that name"
        )
    for tracked_id, _, _, _, function_name in found:
        conn.execute(
            sql.SQL("DELETE FROM {}.tracked_tables WHERE id = %s").format(sql.Identifier(audit_schema)),
            [tracked_id],
        )
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(audit_schema, function_name))
        )
    return True


def tracked_tables(conn: psycopg.Connection, audit_schema: str = DEFAULT_SCHEMA) -> list[TrackedTable]:
    """Every tracked table with its status, and every leftover (orphaned) capture function."""
    check_schema_name(audit_schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT table_schema, table_name, status, detail, key_columns, exclude_columns,"
            "       mask_columns, mode, function_name FROM {}.tracking_status()"
        ).format(sql.Identifier(audit_schema))
    ).fetchall()
    return [
        TrackedTable(
            table_schema=r[0],
            table_name=r[1],
            status=r[2],
            detail=r[3],
            keys=tuple(r[4] or ()),
            exclude=tuple(r[5] or ()),
            mask=tuple(r[6] or ()),
            mode=r[7],
            function_name=r[8],
            audit_schema=audit_schema,
        )
        for r in rows
    ]


def sync(
    conn: psycopg.Connection, *, prune: bool = True, audit_schema: str = DEFAULT_SCHEMA
) -> list[SyncAction]:
    """Bring every tracked table to its stored configuration, in one transaction: follow renamed
    tables and columns, regenerate outdated or incomplete capture code, and (``prune``) remove
    capture code whose table or registry row is gone. Disabled triggers are left as they are."""
    require_installed(conn, audit_schema)
    with conn.transaction():
        rows = conn.execute(
            sql.SQL("SELECT table_schema, table_name, action, detail FROM {}.sync(%s)").format(
                sql.Identifier(audit_schema)
            ),
            [prune],
        ).fetchall()
    return [SyncAction(*r) for r in rows]
