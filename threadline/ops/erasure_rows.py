"""The rows of one table row's history that :func:`threadline.ops.erasure.erase` rewrites, and the
check of the column policies it is given."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import InvalidFilter
from threadline.core.records import exact_json
from threadline.explore.tables import TableRef, key_condition, key_json

__all__ = ["check_columns", "row_changes"]


def row_changes(
    cur: psycopg.Cursor[Any], audit: sql.Identifier, ref: TableRef, key_values: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every change of the row now keyed ``key_values``, also under the keys it had before an
    update changed its key (each earlier key only up to that update: the key may have gone to
    another row since). Rows are dicts with ``transaction_id``, ``id``, ``after``, ``before``."""
    found: dict[int, dict[str, Any]] = {}
    todo: list[tuple[str, int | None]] = [(key_json(key_values), None)]
    seen = {todo[0][0]}
    while todo:
        key_text, upto = todo.pop()
        params: dict[str, Any] = {"pk": key_text, "upto": upto, "cols": list(key_values)}
        rows = cur.execute(
            sql.SQL(
                "SELECT c.transaction_id, c.id, c.after::text AS after, c.before::text AS before,"
                "       CASE WHEN c.op = 'update' AND c.before IS NOT NULL THEN NULLIF("
                "         (SELECT jsonb_object_agg(k, c.before::jsonb -> k) FROM unnest(%(cols)s::text[]) k),"
                "         c.pk)::text END AS earlier_key"
                "  FROM {}.changes c WHERE {} AND {} AND (%(upto)s::bigint IS NULL OR c.id < %(upto)s::bigint)"
                " ORDER BY c.transaction_id, c.id"
            ).format(audit, key_condition("%(pk)s::jsonb"), ref.condition(params)),
            params,
        ).fetchall()
        for r in rows:
            found.setdefault(r["id"], r)
            earlier = r["earlier_key"]
            if earlier is not None and earlier not in seen:
                seen.add(earlier)
                todo.append((earlier, r["id"]))
    return sorted(found.values(), key=lambda r: (r["transaction_id"], r["id"]))


def check_columns(
    cur: psycopg.Cursor[Any],
    ref: TableRef,
    key_values: dict[str, Any],
    columns: dict[str, str],
    found: list[dict[str, Any]],
) -> None:
    """Refuse a column policy that names a column neither the table nor any recorded image of
    the row has (a typo would leave the value in clear), or a key column (always kept)."""
    if not columns:
        return
    known: set[str] = set()
    for change in found:
        for side in ("after", "before"):
            image = exact_json(change[side]) if change[side] else None
            if isinstance(image, dict):
                known.update(image)
    if ref.in_catalog:
        rows = cur.execute(
            "SELECT a.attname::text AS attname FROM pg_attribute a"
            "  JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
            [ref.schema, ref.name],
        ).fetchall()
        known.update(r["attname"] for r in rows)
    unknown = sorted(c for c in columns if c not in known)
    if unknown:
        raise InvalidFilter(
            f"column(s) {', '.join(unknown)} not found in {ref} or in the row's recorded images"
            f" (columns: {', '.join(sorted(known)) or 'none recorded'})"
        )
    keyed = sorted(c for c, rule in columns.items() if c in key_values and rule != "keep")
    if keyed:
        raise InvalidFilter(f"key column(s) {', '.join(keyed)} name the row and are always kept")
