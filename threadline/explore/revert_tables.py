"""The tables a revert touches, as they are now (found from the names the changes were captured
under), and their rows: matched by key, read, and captured images compared with them by value."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.erased import ERASED_JSON_TEXT, is_erased
from threadline.core.records import exact_json
from threadline.ddl.names import qualified_name
from threadline.explore.revert_records import RevertError, RevertTable


def resolve_tables(
    cur: psycopg.Cursor[Any], audit: sql.Identifier, names: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], RevertTable]:
    """The table each captured name stands for now (through the registry of names, then the catalog)."""
    out: dict[tuple[str, str], RevertTable] = {}
    for schema, name in sorted(set(names)):
        row = cur.execute(
            sql.SQL(
                "SELECT coalesce((SELECT t.relid FROM {a}.tracked_table_names n JOIN {a}.tracked_tables t ON t.id = n.tracked_id"
                "                  WHERE n.table_schema = %(s)s AND n.table_name = %(n)s LIMIT 1),"
                "                to_regclass(format('%%I.%%I', %(s)s::text, %(n)s::text)))::oid AS oid"
            ).format(a=audit),
            {"s": schema, "n": name},
        ).fetchone()
        if row is None or row["oid"] is None:
            raise RevertError(
                f"table {qualified_name(schema, name)} no longer exists: its changes cannot be reverted"
            )
        info = cur.execute(
            sql.SQL(
                "SELECT format('%%I.%%I', ns.nspname, c.relname) AS regclass, ns.nspname AS s, c.relname AS n,"
                " t.key_columns, {a}.effective_mask(c.oid, t.exclude, t.mask) AS mask, t.exclude,"
                " c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid) AS inherited,"
                " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0"
                "        AND NOT a.attisdropped ORDER BY a.attnum) AS columns,"
                " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0"
                "        AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum) AS insertable,"
                " ARRAY(SELECT x.name FROM {a}.cast_exposed_columns(c.oid) AS x WHERE x.in_json) AS as_text,"
                " ARRAY(SELECT x.container FROM {a}.cast_exposed_columns(c.oid) AS x WHERE x.in_json) AS containers,"
                " ARRAY(SELECT k FROM unnest({a}.json_columns(c.oid)) AS k WHERE k = ANY (t.key_columns) ORDER BY 1)"
                "  AS json_keys"
                "  FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace"
                "  LEFT JOIN {a}.tracked_tables t ON t.relid = c.oid WHERE c.oid = %(oid)s"
            ).format(a=audit),
            {"oid": row["oid"]},
        ).fetchone()
        assert info is not None
        if not info["key_columns"]:
            raise RevertError(
                f"{info['regclass']} is not tracked now: track it again before reverting its changes"
            )
        if info["inherited"]:
            raise RevertError(
                f"{info['regclass']} has inheritance children: a change captured through it may be of a row"
                " that lives in a child table, which a revert would restore into the parent, without the"
                " child's own columns; restore those rows by hand (threadline history shows their values)"
            )
        if info["json_keys"]:
            raise RevertError(
                f"{info['regclass']} is keyed by {', '.join(info['json_keys'])}, which may hold json: json has"
                " no equality, so a revert cannot find a row by its key; restore those rows by hand"
                " (threadline history shows their values)"
            )
        out[(schema, name)] = RevertTable(
            regclass=info["regclass"],
            name=qualified_name(info["s"], info["n"]),
            keys=tuple(info["key_columns"]),
            masked=frozenset(info["mask"]) & frozenset(info["columns"]),
            excluded=frozenset(info["exclude"]) & frozenset(info["columns"]),
            columns=tuple(info["columns"]),
            insertable=tuple(info["insertable"]),
            oid=row["oid"],
            as_text=tuple(zip(info["as_text"], info["containers"], strict=True)),
        )
    return out


def relation_sql(table: RevertTable) -> sql.Composable:
    """The table's name in SQL, as the catalog gives it (each part quoted by ``format('%I.%I')``)."""
    return sql.SQL(table.regclass)


def key_match(table: RevertTable, alias: str = "t") -> sql.Composable:
    """``(t.k1, t.k2) = (SELECT r.k1, r.k2 FROM json_populate_record(NULL::tbl, %(pk)s) r)``."""
    cols = [sql.Identifier(k) for k in table.keys]
    return sql.SQL("({}) = (SELECT {} FROM json_populate_record(NULL::{}, %(pk)s::json) AS r)").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), c) for c in cols),
        sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols),
        relation_sql(table),
    )


def row_json(table: RevertTable, alias: str) -> sql.Composable:
    """``to_json()`` of the row ``alias`` of ``table``, with the values of :attr:`RevertTable.as_text`
    as their output text (``concat()``, which calls no cast), as capture writes them."""
    if not table.as_text:
        return sql.SQL("to_json({}.*)").format(sql.Identifier(alias))
    shown = dict(table.as_text)
    parts = []
    for column in table.columns:
        value = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
        if column not in shown:
            parts.append(value)
        elif shown[column]:  # a composite's or an array's text is never empty
            parts.append(
                sql.SQL("nullif(pg_catalog.concat({}), '') AS {}").format(value, sql.Identifier(column))
            )
        else:
            parts.append(
                sql.SQL("CASE WHEN {v} IS NULL THEN NULL ELSE pg_catalog.concat({v}) END AS {c}").format(
                    v=value, c=sql.Identifier(column)
                )
            )
    return sql.SQL("(SELECT to_json(s.*) FROM (SELECT {}) AS s)").format(sql.SQL(", ").join(parts))


def current_row(
    cur: psycopg.Cursor[Any], table: RevertTable, pk_text: str, lock: bool
) -> dict[str, Any] | None:
    """The row with key ``pk_text`` as it is now (locked ``FOR UPDATE`` if ``lock``); ``None`` when absent."""
    statement = sql.SQL("SELECT {}::text AS row FROM {} AS t WHERE {}{}").format(
        row_json(table, "t"),
        relation_sql(table),
        key_match(table),
        sql.SQL(" FOR UPDATE") if lock else sql.SQL(""),
    )
    rows = cur.execute(statement, {"pk": pk_text}).fetchmany(2)
    if len(rows) > 1:
        raise RevertError(
            f"{table.name} holds more than one row with the key {pk_text}: the key columns it is tracked"
            " with are not unique, so revert cannot tell which row to restore; give it a key that a"
            " unique index covers (threadline track --keys)"
        )
    return None if not rows else dict(exact_json(rows[0]["row"]))


def image_sql(table: RevertTable, param: str) -> sql.Composable:
    """The image in parameter ``param`` without its masked and excluded keys, as json.

    A masked value is the text ``[masked]``, which a column of another type (a date, a number)
    cannot take: the image is read into the table's row type only without them."""
    return sql.SQL(
        "(SELECT coalesce(json_object_agg(e.key, e.value), '{{}}') FROM json_each({}::json) AS e"
        " WHERE e.key <> ALL ({}::text[]) AND e.value::text !~ {})"
    ).format(
        sql.Placeholder(param),
        sql.Literal(sorted(table.masked | table.excluded)),
        sql.Literal(ERASED_JSON_TEXT),
    )


def rendered_image(cur: psycopg.Cursor[Any], table: RevertTable, image_text: str | None) -> dict[str, Any]:
    """A captured image's visible values as this session renders the table's columns now.

    Images are text made in the capturing session (a ``timestamptz`` in its time zone, say):
    read back into the row type, they compare with the current row by value, not by spelling."""
    row = cur.execute(
        sql.SQL("SELECT {}::text AS row FROM json_populate_record(NULL::{}, {}) AS r").format(
            row_json(table, "r"), relation_sql(table), image_sql(table, "image")
        ),
        {"image": image_text or "{}"},
    ).fetchone()
    assert row is not None
    shown = visible_values(table, exact_json(image_text) or {})
    return {k: v for k, v in exact_json(row["row"]).items() if k in shown}


def visible_values(table: RevertTable, image: Mapping[str, Any]) -> dict[str, Any]:
    """The image's values of the table's current columns that are neither masked nor excluded,
    nor put there by an erasure."""
    return {
        k: v
        for k, v in image.items()
        if k not in table.masked and k not in table.excluded and k in table.columns and not is_erased(v)
    }


def unrestorable(table: RevertTable, image: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """The columns of ``image`` a revert cannot restore beyond the masked and excluded ones: those
    whose value an erasure replaced, and those the table no longer has (renamed or dropped)."""
    erased, gone = [], []
    for k, v in (image or {}).items():
        if k in table.masked or k in table.excluded:
            continue
        if k not in table.columns:
            gone.append(k)
        elif is_erased(v):
            erased.append(k)
    return sorted(erased), sorted(gone)
