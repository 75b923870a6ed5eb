"""Per-table capture: generated, column-aware statement-level triggers.

For every tracked table threadline generates one PL/pgSQL function with the table's key columns,
tracked columns, exclusions and masks baked in, and four ``AFTER ... FOR EACH STATEMENT``
triggers (insert, update, delete with transition tables; truncate): one ``INSERT ... SELECT``
captures every row a statement changed. Update rows are paired by their position in the
transition tables, so updates that change the primary key are captured correctly. The
transaction row's id comes from a transaction-local cache checked against the row's xid (see
``_TRANSACTION_ID``), so a statement after the first costs one primary-key lookup. The generated SQL is
deterministic and carries a fingerprint of what it was generated from, so a table whose columns
changed since can be found (:func:`tracked_tables`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from threadline.ddl.names import (
    DEFAULT_SCHEMA,
    capture_function_name,
    check_schema_name,
    trigger_name,
)
from threadline.ddl.schema import require_installed
from threadline.errors import (
    InvalidTrackOption,
    NoPrimaryKey,
    TrackingError,
    UnknownColumn,
    UnknownTable,
)

CAPTURE_VERSION = 6
"""Version of the generated capture code; part of every fingerprint."""

MASK_PLACEHOLDER = "[masked]"
"""What a masked column's value is replaced with in every audit image."""

OPS = ("insert", "update", "delete", "truncate")
# Aliases of the transition tables' rows; they cannot collide with a column (``to_jsonb(alias)``
# would then read the column) because columns with these names are refused.
_OLD = "threadline old"
_NEW = "threadline new"
_RESERVED = (_OLD, _NEW, "threadline rn", "threadline row")
_NEW_TABLE = "threadline_new"
_OLD_TABLE = "threadline_old"


@dataclass(frozen=True)
class Column:
    """A column of a tracked table. ``comparable`` is False for types without equality."""

    name: str
    type: str
    comparable: bool
    type_schema: str = "pg_catalog"
    """Schema of the type whose equality compares the column (a domain's or array's base type)."""


@dataclass(frozen=True)
class CapturePlan:
    """Everything the generated capture code is made from."""

    audit_schema: str
    table_schema: str
    table_name: str
    columns: tuple[Column, ...]
    keys: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    keys_given: bool = field(default=False)

    @property
    def function_name(self) -> str:
        """Name of the generated function inside the audit schema."""
        return capture_function_name(self.table_schema, self.table_name)

    def config(self) -> dict[str, object]:
        """The options and column set, as recorded in the function's comment."""
        return {
            "capture_version": CAPTURE_VERSION,
            "table": [self.table_schema, self.table_name],
            "keys": list(self.keys),
            "keys_given": self.keys_given,
            "exclude": list(self.exclude),
            "mask": list(self.mask),
            "columns": [[c.name, c.type] for c in self.columns],
        }

    @property
    def fingerprint(self) -> str:
        """Hash of :meth:`config`: changes whenever the generated code would change."""
        text = json.dumps(self.config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TrackedTable:
    """A table with capture installed, as found in the database."""

    table_schema: str
    table_name: str
    keys: tuple[str, ...]
    exclude: tuple[str, ...]
    mask: tuple[str, ...]
    fingerprint: str
    current: bool
    """False when the table's columns (or this release's capture code) changed since tracking:
    run ``threadline track`` on it again."""


# ---------------------------------------------------------------------------------------------
# Names


def parse_table_name(text: str) -> tuple[str | None, str]:
    """Split ``[schema.]table`` into ``(schema or None, table)``.

    A part may be double-quoted, with ``""`` for a quote inside (needed for names holding a dot).
    Unquoted parts are taken literally, with no case folding. A name without a schema is looked up
    on the search path.
    """
    if not isinstance(text, str) or not text:
        raise UnknownTable("table name is empty")
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            buf, j = [], i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise UnknownTable(f"unbalanced quotes in table name {text!r}")
                buf.append(text[j:k])
                if text[k + 1 : k + 2] != '"':
                    break
                buf.append('"')
                j = k + 2
            parts.append("".join(buf))
            i = k + 1
        else:
            k = text.find(".", i)
            k = n if k < 0 else k
            parts.append(text[i:k])
            i = k
        if i >= n:
            break
        if text[i] != ".":
            raise UnknownTable(f"unexpected text after a quoted name in {text!r}")
        i += 1
    if len(parts) > 2 or not all(parts):
        raise UnknownTable(f"{text!r} is not of the form [schema.]table (quote names that contain a dot)")
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


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


def _columns(conn: psycopg.Connection, schema: str, table: str) -> tuple[Column, ...]:
    rows = conn.execute(
        """
        WITH RECURSIVE cols AS (
            SELECT a.attnum, a.attname, a.atttypid,
                   format_type(a.atttypid, a.atttypmod) AS shown
              FROM pg_attribute a
             WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass
               AND a.attnum > 0 AND NOT a.attisdropped
        ), base AS (
            -- follow domains and arrays down to the type whose equality decides
            SELECT attnum, atttypid AS t, 0 AS depth FROM cols
            UNION ALL
            SELECT b.attnum,
                   CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.typelem END,
                   b.depth + 1
              FROM base b JOIN pg_type ty ON ty.oid = b.t
             WHERE (ty.typtype = 'd' OR (ty.typelem <> 0 AND ty.typlen = -1)) AND b.depth < 8
        )
        SELECT c.attname, c.shown,
               (SELECT ty.typtype IN ('b', 'e')
                       AND EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
                                    WHERE am.amname = 'btree' AND oc.opcdefault
                                      AND (oc.opcintype = ty.oid
                                           OR (ty.typtype = 'e' AND oc.opcintype = 'anyenum'::regtype)))
                  FROM base b JOIN pg_type ty ON ty.oid = b.t
                 WHERE b.attnum = c.attnum
                 ORDER BY b.depth DESC LIMIT 1) AS comparable,
               (SELECT tn.nspname
                  FROM base b JOIN pg_type ty ON ty.oid = b.t JOIN pg_namespace tn ON tn.oid = ty.typnamespace
                 WHERE b.attnum = c.attnum
                 ORDER BY b.depth DESC LIMIT 1) AS type_schema
          FROM cols c
         ORDER BY c.attnum
        """,
        [schema, table],
    ).fetchall()
    return tuple(
        Column(name, shown, bool(comparable), type_schema or "pg_catalog")
        for name, shown, comparable, type_schema in rows
    )


def _primary_key(conn: psycopg.Connection, schema: str, table: str) -> tuple[str, ...]:
    rows = conn.execute(
        """
        SELECT a.attname
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND i.indisprimary
         ORDER BY k.ord
        """,
        [schema, table],
    ).fetchall()
    return tuple(r[0] for r in rows)


def _names(values: Iterable[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = values.split(",")
    out: list[str] = []
    for v in values:
        v = v.strip() if isinstance(v, str) else v
        if not isinstance(v, str) or not v:
            raise InvalidTrackOption(f"column names must be non-empty strings, got {v!r}")
        if v not in out:
            out.append(v)
    return tuple(out)


def plan_capture(
    conn: psycopg.Connection,
    table: str,
    *,
    schema: str | None = None,
    exclude: Iterable[str] | str | None = None,
    mask: Iterable[str] | str | None = None,
    keys: Iterable[str] | str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> CapturePlan:
    """Inspect a table and validate the options; raises a :class:`TrackingError` subclass."""
    check_schema_name(audit_schema)
    if schema is None:
        schema, table = parse_table_name(table)
    table_schema, table_name, _ = _resolve(conn, table, schema)
    if table_schema == audit_schema:
        raise InvalidTrackOption(
            f"{table_schema}.{table_name} belongs to the audit schema; audit tables are never tracked"
        )
    columns = _columns(conn, table_schema, table_name)
    known = {c.name for c in columns}
    reserved = sorted(known.intersection(_RESERVED))
    if reserved:
        raise InvalidTrackOption(f"column name(s) {reserved} are reserved by threadline")
    excl, masked, key_names = _names(exclude), _names(mask), _names(keys)
    for option, names in (("--exclude", excl), ("--mask", masked), ("--keys", key_names)):
        missing = [n for n in names if n not in known]
        if missing:
            raise UnknownColumn(
                f"{option}: column(s) {', '.join(map(repr, missing))} not found in "
                f"{table_schema}.{table_name} (columns: {', '.join(sorted(known))})"
            )
    both = sorted(set(excl) & set(masked))
    if both:
        raise InvalidTrackOption(f"column(s) {both} are named in both --exclude and --mask; pick one")
    primary = key_names or _primary_key(conn, table_schema, table_name)
    if not primary:
        raise NoPrimaryKey(
            f"{table_schema}.{table_name} has no primary key: add one, or name the columns that "
            "identify a row with --keys"
        )
    clash = sorted(set(primary) & (set(excl) | set(masked)))
    if clash:
        raise InvalidTrackOption(f"key column(s) {clash} cannot be excluded or masked")
    return CapturePlan(
        audit_schema=audit_schema,
        table_schema=table_schema,
        table_name=table_name,
        columns=columns,
        keys=tuple(primary),
        exclude=excl,
        mask=masked,
        keys_given=bool(key_names),
    )


# ---------------------------------------------------------------------------------------------
# SQL generation


def _lit(value: object) -> sql.Composable:
    return sql.Literal(value)


def _col(alias: sql.Composable, name: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(alias, sql.Identifier(name))


_OLD_ROW = sql.Identifier(_OLD)
_NEW_ROW = sql.Identifier(_NEW)
_ROW_NUMBER = "threadline rn"


def _distinct(plan_col: Column, negate: bool = False) -> sql.Composable:
    """``old.c IS [NOT] DISTINCT FROM new.c`` (compared as text for types without equality)."""
    op = sql.SQL("IS NOT DISTINCT FROM" if negate else "IS DISTINCT FROM")
    old, new = _col(_OLD_ROW, plan_col.name), _col(_NEW_ROW, plan_col.name)
    if not plan_col.comparable or plan_col.type_schema != "pg_catalog":
        # types without equality, and types whose operators live outside pg_catalog (see
        # _PINNED_SEARCH_PATH), are compared by their text form
        old = sql.SQL("{}::text").format(old)
        new = sql.SQL("{}::text").format(new)
    return sql.SQL("{} {} {}").format(old, op, new)


def _image(plan: CapturePlan, row: sql.Composable, extra_drop: Sequence[str] = ()) -> sql.Composable:
    """``to_jsonb(row)`` with excluded (and helper) keys removed and masked values replaced."""
    expr: sql.Composable = sql.SQL("to_jsonb({})").format(row)
    drop = [*extra_drop, *plan.exclude]
    if drop:
        expr = sql.SQL("({} - {}::text[])").format(expr, _lit(drop))
    if plan.mask:
        masks = json.dumps({m: MASK_PLACEHOLDER for m in plan.mask}, sort_keys=True)
        expr = sql.SQL("({} || {}::jsonb)").format(expr, _lit(masks))
    return expr


def _pk(plan: CapturePlan, row: sql.Composable) -> sql.Composable:
    parts = [sql.SQL("{}, {}").format(_lit(k), _col(row, k)) for k in plan.keys]
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(parts))


def _update_select(plan: CapturePlan) -> sql.Composable:
    """``SELECT`` of one change per updated row that changed a tracked column.

    Rows of the old and new transition tables are paired by position, which also pairs rows
    whose primary key changed.
    """
    tracked = [c for c in plan.columns if c.name not in plan.exclude]
    # the keys the before image drops, in one array (one jsonb rebuild): the row-number helper,
    # excluded columns, and each tracked column whose value did not change
    dropped = sql.SQL("ARRAY[{}]::text[]").format(
        sql.SQL(", ").join(
            [_lit(name) for name in (_ROW_NUMBER, *plan.exclude)]
            + [
                sql.SQL("CASE WHEN {} THEN {} END").format(_distinct(c, negate=True), _lit(c.name))
                for c in tracked
            ]
        )
    )
    changed = sql.SQL("array_remove(ARRAY[{}]::text[], NULL)").format(
        sql.SQL(", ").join(
            sql.SQL("CASE WHEN {} THEN {} END").format(_distinct(c), _lit(c.name)) for c in tracked
        )
    )
    before: sql.Composable = sql.SQL("(to_jsonb({}) - {})").format(_OLD_ROW, dropped)
    for m in plan.mask:
        col = next(c for c in plan.columns if c.name == m)
        before = sql.SQL("({} || CASE WHEN {} THEN {}::jsonb ELSE '{{}}'::jsonb END)").format(
            before, _distinct(col), _lit(json.dumps({m: MASK_PLACEHOLDER}))
        )
    side = "SELECT row_number() OVER () AS {rn}, {row}.* FROM {tbl} AS {row}"
    return sql.SQL(
        "    SELECT " + _TRANSACTION_ID + ", {s}, {t}, 'update',\n"
        "           {pk}, {after}, {before}, {changed}\n"
        "      FROM (" + side + ") AS {old}\n"
        "      JOIN (" + side.replace("{tbl}", "{tbl2}") + ") AS {new} ON {old}.{rn} = {new}.{rn}\n"
        "     WHERE {any_changed};\n"
    ).format(
        audit=sql.Identifier(plan.audit_schema),
        s=_lit(plan.table_schema),
        t=_lit(plan.table_name),
        pk=_pk(plan, _NEW_ROW),
        after=_image(plan, _NEW_ROW, [_ROW_NUMBER]),
        before=before,
        changed=changed,
        old=_OLD_ROW,
        new=_NEW_ROW,
        row=sql.Identifier("threadline row"),
        rn=sql.Identifier(_ROW_NUMBER),
        tbl=sql.Identifier(_OLD_TABLE),
        tbl2=sql.Identifier(_NEW_TABLE),
        any_changed=sql.SQL(" OR ").join(_distinct(c) for c in tracked),
    )


def _function_body(plan: CapturePlan) -> str:
    audit = sql.Identifier(plan.audit_schema)
    columns = "INSERT INTO {audit}.changes (transaction_id, table_schema, table_name, op, pk, {cols})\n"
    # The scalar subquery runs once per statement, and only when the statement changed a row.
    from_transition = (
        columns + "    SELECT " + _TRANSACTION_ID + ", {s}, {t}, {op}, {pk}, {image}\n"
        "      FROM {table} AS {alias};\n"
    )
    where = {"audit": audit, "s": _lit(plan.table_schema), "t": _lit(plan.table_name)}
    new_alias, old_alias = _NEW_ROW, _OLD_ROW
    body = sql.SQL(
        "\nBEGIN\n"
        "  IF TG_OP = 'UPDATE' THEN\n"
        "    {upd}"
        "  ELSIF TG_OP = 'INSERT' THEN\n"
        "    {ins}"
        "  ELSIF TG_OP = 'DELETE' THEN\n"
        "    {dele}"
        "  ELSIF TG_OP = 'TRUNCATE' THEN\n"
        "    INSERT INTO {audit}.changes (transaction_id, table_schema, table_name, op)\n"
        "    VALUES ({audit}.transaction_id(), {s}, {t}, 'truncate');\n"
        "  END IF;\n"
        "  RETURN NULL;\n"
        "END\n"
    ).format(
        upd=sql.SQL(columns + "{rest}").format(
            cols=sql.SQL("after, before, changed_fields"),
            rest=_update_select(plan),
            **where,
        ),
        ins=sql.SQL(from_transition).format(
            cols=sql.SQL("after"),
            op=_lit("insert"),
            pk=_pk(plan, new_alias),
            image=_image(plan, new_alias),
            table=sql.Identifier(_NEW_TABLE),
            alias=new_alias,
            **where,
        ),
        dele=sql.SQL(from_transition).format(
            cols=sql.SQL("before"),
            op=_lit("delete"),
            pk=_pk(plan, old_alias),
            image=_image(plan, old_alias),
            table=sql.Identifier(_OLD_TABLE),
            alias=old_alias,
            **where,
        ),
        **where,
    )
    return body.as_string(None)


def _dollar_quote(body: str) -> str:
    """Dollar-quote ``body`` with a tag that cannot occur in it (identifiers may hold ``$``)."""
    n = 0
    while True:
        tag = "$threadline$" if n == 0 else f"$threadline{n}$"
        if tag not in body:
            return f"{tag}{body}{tag}"
        n += 1


# The capture function's pinned search path. It runs as its owner (SECURITY DEFINER), so no name in
# it may resolve through a schema the application can write to: a function such as
# public.jsonb_build_object(text, integer) would otherwise win overload resolution over
# pg_catalog's and run as the owner. Tables and threadline's own functions are schema-qualified;
# columns whose (base) type lives outside pg_catalog are compared by their text form (see
# _distinct), so their operators are never looked up. pg_temp is never searched for functions or
# operators; naming it last keeps temporary tables from shadowing anything.
_PINNED_SEARCH_PATH = sql.SQL("pg_catalog, pg_temp")

# The transactions row id for a statement's changes (an init plan: evaluated once per statement,
# and only when the statement changed a row). After the first statement of a transaction the id
# comes from the transaction-local cache, checked against the row's own xid with one primary-key
# lookup, so a cache value set by hand cannot attach changes to another transaction's row.
_TRANSACTION_ID = (
    "(SELECT coalesce((SELECT t.id FROM {audit}.transactions AS t\n"
    "                   WHERE t.id = {audit}.cached_transaction_id() AND t.xid = pg_current_xact_id()),\n"
    "                 {audit}.transaction_row()))"
)


def track_sql_for(plan: CapturePlan) -> str:
    """The complete, idempotent DDL that installs capture for one planned table."""
    audit = sql.Identifier(plan.audit_schema)
    fn = sql.SQL("{}.{}").format(audit, sql.Identifier(plan.function_name))
    table = sql.SQL("{}.{}").format(sql.Identifier(plan.table_schema), sql.Identifier(plan.table_name))
    header = (
        f"-- threadline capture v{CAPTURE_VERSION} fingerprint {plan.fingerprint}\n"
        f"-- table {json.dumps([plan.table_schema, plan.table_name], ensure_ascii=True)}\n"
    )
    stmts: list[sql.Composable] = [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql\n"
            "SECURITY DEFINER SET search_path = {} AS {}"
        ).format(fn, _PINNED_SEARCH_PATH, sql.SQL(_dollar_quote(_function_body(plan)))),
        sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
            fn,
            _lit(json.dumps({**plan.config(), "fingerprint": plan.fingerprint}, sort_keys=True)),
        ),
    ]
    referencing = {
        "insert": f"REFERENCING NEW TABLE AS {_NEW_TABLE} FOR EACH STATEMENT",
        "update": f"REFERENCING OLD TABLE AS {_OLD_TABLE} NEW TABLE AS {_NEW_TABLE} FOR EACH STATEMENT",
        "delete": f"REFERENCING OLD TABLE AS {_OLD_TABLE} FOR EACH STATEMENT",
        "truncate": "FOR EACH STATEMENT",
    }
    for op in OPS:
        trig = sql.Identifier(trigger_name(plan.audit_schema, op))
        stmts.append(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trig, table))
        stmts.append(
            sql.SQL("CREATE TRIGGER {} AFTER {} ON {} {} EXECUTE FUNCTION {}()").format(
                trig,
                sql.SQL(op.upper()),
                table,
                sql.SQL(referencing[op]),
                fn,
            )
        )
    return header + "".join(s.as_string(None) + ";\n" for s in stmts)


def untrack_sql_for(audit_schema: str, table_schema: str, table_name: str) -> str:
    """The idempotent DDL that removes capture from one table."""
    table = sql.SQL("{}.{}").format(sql.Identifier(table_schema), sql.Identifier(table_name))
    stmts = [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
            sql.Identifier(trigger_name(audit_schema, op)), table
        )
        for op in OPS
    ]
    stmts.append(
        sql.SQL("DROP FUNCTION IF EXISTS {}.{}()").format(
            sql.Identifier(audit_schema),
            sql.Identifier(capture_function_name(table_schema, table_name)),
        )
    )
    return "".join(s.as_string(None) + ";\n" for s in stmts)


# ---------------------------------------------------------------------------------------------
# Public operations


def track_sql(conn: psycopg.Connection, table: str, **options: object) -> str:
    """The DDL :func:`track` would run (reads the table's columns and keys from ``conn``)."""
    return track_sql_for(plan_capture(conn, table, **options))  # type: ignore[arg-type]


def track(
    conn: psycopg.Connection,
    table: str,
    *,
    schema: str | None = None,
    exclude: Iterable[str] | str | None = None,
    mask: Iterable[str] | str | None = None,
    keys: Iterable[str] | str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> CapturePlan:
    """Install (or refresh) capture on ``table``, in one transaction. Idempotent."""
    require_installed(conn, audit_schema)
    with conn.transaction():
        plan = plan_capture(
            conn, table, schema=schema, exclude=exclude, mask=mask, keys=keys, audit_schema=audit_schema
        )
        conn.execute(track_sql_for(plan).encode())
    return plan


def untrack(
    conn: psycopg.Connection,
    table: str,
    *,
    schema: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> bool:
    """Remove capture from ``table``; returns False if it was not tracked."""
    check_schema_name(audit_schema)
    if schema is None:
        schema, table = parse_table_name(table)
    with conn.transaction():
        table_schema, table_name, _ = _resolve(conn, table, schema)
        was = any(
            t.table_schema == table_schema and t.table_name == table_name
            for t in tracked_tables(conn, audit_schema)
        )
        conn.execute(untrack_sql_for(audit_schema, table_schema, table_name).encode())
    return was


def untrack_sql(
    conn: psycopg.Connection, table: str, *, schema: str | None = None, audit_schema: str = DEFAULT_SCHEMA
) -> str:
    """The DDL :func:`untrack` would run."""
    check_schema_name(audit_schema)
    if schema is None:
        schema, table = parse_table_name(table)
    table_schema, table_name, _ = _resolve(conn, table, schema)
    return untrack_sql_for(audit_schema, table_schema, table_name)


def tracked_tables(conn: psycopg.Connection, audit_schema: str = DEFAULT_SCHEMA) -> list[TrackedTable]:
    """Every table with this audit schema's capture trigger, and whether its code is current."""
    check_schema_name(audit_schema)
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, obj_description(p.oid, 'pg_proc')
          FROM pg_trigger tg
          JOIN pg_class c ON c.oid = tg.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_proc p ON p.oid = tg.tgfoid
          JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE tg.tgname = %s AND pn.nspname = %s
         ORDER BY n.nspname, c.relname
        """,
        [trigger_name(audit_schema, "insert"), audit_schema],
    ).fetchall()
    out: list[TrackedTable] = []
    for table_schema, table_name, comment in rows:
        try:
            recorded = json.loads(comment or "{}")
        except ValueError:
            recorded = {}
        keys = tuple(recorded.get("keys", ()))
        exclude = tuple(recorded.get("exclude", ()))
        mask = tuple(recorded.get("mask", ()))
        fingerprint = str(recorded.get("fingerprint", ""))
        try:
            now = plan_capture(
                conn,
                table_name,
                schema=table_schema,
                exclude=exclude,
                mask=mask,
                keys=keys if recorded.get("keys_given") else None,
                audit_schema=audit_schema,
            )
            current = now.fingerprint == fingerprint
        except TrackingError:
            current = False
        out.append(TrackedTable(table_schema, table_name, keys, exclude, mask, fingerprint, current))
    return out
