"""Planning a revert (:func:`plan_revert`): the rows a scope touched, folded per row to the state
before its first change, checked for later changes and hidden columns, and ordered by the foreign
keys between the tables. Applying the plan is :func:`threadline.explore.revert.revert`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.records import exact_json, iso
from threadline.ddl.names import qualified_name
from threadline.explore.revert_order import order_steps
from threadline.explore.revert_records import (
    MASKED,
    Conflict,
    HiddenColumns,
    RevertConflict,
    RevertError,
    RevertPlan,
    RevertRow,
    RevertStep,
    RevertTable,
)
from threadline.explore.revert_scope import SCOPE_SQL, revert_scope
from threadline.explore.revert_tables import (
    current_row,
    image_sql,
    key_match,
    relation_sql,
    rendered_image,
    resolve_tables,
    unrestorable,
    visible_values,
)
from threadline.explore.selection import has_unreadable_escape, truncate_change_join
from threadline.explore.tables import key_condition

__all__ = ["image_sql", "key_match", "plan_revert", "relation_sql", "revert_scope"]


def _key_text(pk: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pk.items())


def plan_revert(
    cur: psycopg.Cursor[Any],
    audit: sql.Identifier,
    scope: dict[str, Any],
    overwrite: bool,
    skip_hidden: bool,
    lock: bool,
) -> tuple[RevertPlan, list[RevertRow], dict[tuple[str, str], RevertTable]]:
    """The plan reverting ``scope`` (from :func:`revert_scope`), the rows of its steps in order, and
    the tables they belong to; raises :class:`RevertConflict` or :class:`HiddenColumns` when the
    revert needs ``overwrite`` or ``skip_hidden``. ``lock`` locks the current rows it reads."""
    key, value = next(iter(scope.items()))
    ids = [r["id"] for r in cur.execute(sql.SQL(SCOPE_SQL[key]).format(a=audit), {"v": value}).fetchall()]
    if not ids:
        raise RevertError(f"no transaction recorded for {key} {value}")
    # an image holding an escape the database cannot decode (a json column's value with \u0000 or
    # half a surrogate pair) is read by none of the json functions a revert needs (before_row(),
    # changed_fields(), json_populate_record()): such a change is flagged (unreadable) instead,
    # and the revert refused
    changes = cur.execute(
        sql.SQL(
            "SELECT c.id, c.transaction_id, c.table_schema, c.table_name, c.op, c.pk::text AS pk_text,"
            " CASE WHEN NOT n.unreadable THEN {a}.before_row(c.before, c.after)::text END AS before_text,"
            " c.after::text AS after_text,"
            " CASE WHEN NOT n.unreadable THEN coalesce(c.changed_fields, {a}.changed_fields(c.before, c.after)) END AS changed,"
            " c.captured_at, n.unreadable, CASE WHEN n.unreadable THEN c.before::text END AS unreadable_before"
            "  FROM {a}.changes c"
            "  CROSS JOIN LATERAL (SELECT coalesce({before}, false) OR coalesce({after}, false) AS unreadable) n"
            " WHERE c.transaction_id = ANY (%(ids)s) AND c.op <> 'snapshot'"
            " ORDER BY c.captured_at, c.id"
        ).format(
            a=audit,
            before=sql.SQL(has_unreadable_escape("c.before", "{a}")).format(a=audit),
            after=sql.SQL(has_unreadable_escape("c.after", "{a}")).format(a=audit),
        ),
        {"ids": ids},
    ).fetchall()
    if not changes:
        raise RevertError(f"the transactions of {key} {value} changed no tracked row: nothing to revert")
    _refuse_unreadable_images(changes)
    truncates = [c for c in changes if c["op"] == "truncate"]
    if truncates:
        t = truncates[0]
        raise RevertError(
            f"{qualified_name(t['table_schema'], t['table_name'])} was truncated at {iso(t['captured_at'])} "
            "by these changes: a truncate cannot be reverted row by row (restore the table from its "
            "baseline with threadline as-of, or from a backup)"
        )
    tables = resolve_tables(cur, audit, ((c["table_schema"], c["table_name"]) for c in changes))
    rows: dict[tuple[str, str], RevertRow] = {}
    for c in changes:
        table = tables[(c["table_schema"], c["table_name"])]
        c["pk"], c["before"], c["after"] = (
            exact_json(c[k]) for k in ("pk_text", "before_text", "after_text")
        )
        pk = dict(c["pk"] or {})
        if any(v == MASKED for v in pk.values()):
            raise HiddenColumns(
                f"{table.name}: a row's key is masked, so the row cannot be found to revert it"
            )
        if any(v is None for v in pk.values()):  # NULL equals no key: the row would never be found
            raise RevertError(
                f"{table.name}: the key of the row {c['pk_text']} holds NULL, so the row cannot be found"
                " to revert it (track the table with NOT NULL keys a unique index covers)"
            )
        row_key = (table.regclass, c["pk_text"])  # jsonb's text: keys sorted, numbers exact
        row = rows.get(row_key)
        if row is None:
            row = rows[row_key] = RevertRow(table, pk, c["pk_text"], c, c)
        row.last = c
        changed = set(c["changed"] or ())
        row.changed |= changed
        if changed & table.masked:
            row.masked_changed = True
    conflicts = _later_changes(cur, audit, ids, rows.values())
    explained = {
        (c.table, r.pk_text)
        for r in rows.values()
        for c in conflicts
        if c.table == r.table.name and c.pk == r.pk
    }
    notes: list[str] = []
    steps: list[tuple[RevertRow, RevertStep]] = []
    hidden_needed: list[str] = []
    for row in rows.values():
        table = row.table
        target = None if row.first["op"] == "insert" else rendered_image(cur, table, row.first["before_text"])
        left = None if row.last["op"] == "delete" else rendered_image(cur, table, row.last["after_text"])
        now = current_row(cur, table, row.pk_text, lock)
        drift = None
        if now is not None and left is None:
            drift = "it exists again although the reverted changes deleted it"
        elif now is None and left is not None:
            drift = "it was deleted after the reverted changes"
        # the columns the image shows: one added since has no value in it to compare
        elif (
            now is not None
            and left is not None
            and (differing := sorted(k for k, v in left.items() if now.get(k) != v))
        ):
            drift = f"its current value of {', '.join(differing)} differs from what the reverted changes left"
        if drift is not None and (table.name, row.pk_text) not in explained:
            # a change made while the table was not tracked, or by a session replica role
            conflicts.append(Conflict(table.name, row.pk, drift + ", with no captured change to explain it"))
        hidden = tuple(sorted(table.masked | table.excluded))
        erased, gone = unrestorable(table, None if target is None else row.first["before"])
        if target is None and now is not None:
            steps.append((row, RevertStep(table.name, row.pk, "delete", {}, now)))
        elif target is not None and now is None:
            values = visible_values(table, target)
            if lost := _lost(hidden, erased, gone):
                hidden_needed.append(f"{table.name} ({_key_text(row.pk)}): insert again without {lost}")
            left_out = tuple(sorted({*hidden, *erased, *gone}))
            steps.append((row, RevertStep(table.name, row.pk, "insert", values, None, left_out)))
        elif target is not None and now is not None:
            values = {k: v for k, v in visible_values(table, target).items() if now.get(k) != v}
            masked = tuple(sorted(row.changed & table.masked)) if row.masked_changed else ()
            erased = [k for k in erased if k in row.changed]
            gone = [k for k in gone if k in row.changed]
            if lost := _lost(masked, erased, gone, "masked "):
                hidden_needed.append(f"{table.name} ({_key_text(row.pk)}): update of {lost}")
            left_out = tuple(sorted({*masked, *erased, *gone}))
            if values or left_out:
                steps.append((row, RevertStep(table.name, row.pk, "update", values, now, left_out)))
    if table_excluded := sorted({t.name for t in tables.values() if t.excluded}):
        notes.append(
            f"excluded columns of {', '.join(table_excluded)} were never recorded: changes to them are not reverted"
        )
    ordered = order_steps(cur, steps, tables)
    plan = RevertPlan(
        scope=scope,
        transaction_ids=tuple(sorted({c["transaction_id"] for c in changes})),
        changes=len(changes),
        steps=tuple(s for _, s in ordered),
        conflicts=tuple(conflicts),
        notes=tuple(notes),
    )
    if conflicts and not overwrite:
        raise RevertConflict(
            "rows were changed after the changes being reverted:\n"
            + "\n".join(f"  {c.table} ({_key_text(c.pk)}): {c.detail}" for c in conflicts)
            + "\nrevert with overwrite=True (--overwrite) to replace those later changes too",
            conflicts,
        )
    if hidden_needed and not skip_hidden:
        raise HiddenColumns(
            "the revert would need values it does not have (masked or excluded columns were never"
            " recorded, an erasure replaced erased values, and a column renamed or dropped since has"
            " no place to go back to):\n"
            + "\n".join(f"  {h}" for h in hidden_needed)
            + "\nrevert with skip_hidden=True (--skip-hidden) to leave those columns as they are "
            "(their defaults for a row inserted again)"
        )
    return plan, [r for r, _ in ordered], tables


def _lost(hidden: Sequence[str], erased: Sequence[str], gone: Sequence[str], label: str = "") -> str:
    """The columns a step cannot restore, each group named for why."""
    parts = [f"{label}{', '.join(hidden)}"] if hidden else []
    if erased:
        parts.append(f"erased {', '.join(erased)}")
    if gone:
        parts.append(f"{', '.join(gone)} (no longer a column of the table: renamed or dropped since)")
    return "; ".join(parts)


def _unreadable(text: str) -> bool:
    """Whether ``text`` holds NUL or half a surrogate pair: what a JSON escape the database could
    not decode becomes in Python (a character the database's encoding lacks is not told)."""
    return "\x00" in text or any("\ud800" <= ch <= "\udfff" for ch in text)


def _unreadable_columns(image: Any) -> list[str]:
    """The keys of an image whose values hold what :func:`_unreadable` finds (in a string or a key,
    at any depth)."""

    def holds(value: Any) -> bool:
        if isinstance(value, str):
            return _unreadable(value)
        if isinstance(value, dict):
            return any(_unreadable(k) or holds(v) for k, v in value.items())
        if isinstance(value, list):
            return any(holds(v) for v in value)
        return False

    return [k for k, v in image.items() if holds(v)] if isinstance(image, dict) else []


def _refuse_unreadable_images(changes: list[dict[str, Any]]) -> None:
    """Raise :class:`RevertError` when a change's image holds an escape the database cannot
    decode."""
    flagged = [c for c in changes if c["unreadable"]]
    if not flagged:
        return
    lines = []
    for c in flagged:
        columns: list[str] = []
        for text in (c["unreadable_before"], c["after_text"]):
            columns += [k for k in _unreadable_columns(exact_json(text)) if k not in columns]
        lines.append(
            f"  {qualified_name(c['table_schema'], c['table_name'])} ({_key_text(exact_json(c['pk_text']) or {})}):"
            f" change {c['id']} ({c['op']}, transaction {c['transaction_id']})"
            + (f", column {', '.join(columns)}" if columns else "")
        )
    raise RevertError(
        "these changes cannot be reverted: a JSON value they recorded holds an escape this database"
        " cannot decode (\\u0000, the character NUL; half a surrogate pair; or a character its"
        " encoding lacks), which PostgreSQL's json functions cannot read back into a row:\n"
        + "\n".join(lines)
        + "\nrestore those rows by hand (threadline history shows their values)"
    )


def _later_changes(
    cur: psycopg.Cursor[Any], audit: sql.Identifier, ids: list[int], rows: Iterable[RevertRow]
) -> list[Conflict]:
    """Captured changes of the rows (or truncates of their tables) after their first reverted change."""
    rows = list(rows)
    params = {
        "pks": [r.pk_text for r in rows],
        "schemas": [r.first["table_schema"] for r in rows],
        "names": [r.first["table_name"] for r in rows],
        "ats": [r.first["captured_at"] for r in rows],
        "ids": ids,
    }
    keys = (
        "  FROM unnest(%(pks)s::jsonb[], %(schemas)s::text[], %(names)s::text[], %(ats)s::timestamptz[])"
        "       WITH ORDINALITY AS k(pk, s, n, at, i)"
    )
    # the rows' own later changes (through the key index), then truncates of their tables
    # (through the truncates table, each joined to its change by the key of changes; without the
    # start time, which serves both layouts: a partitioned store searches each partition's key)
    found = cur.execute(
        sql.SQL(
            "SELECT k.i, c.op, c.transaction_id, c.captured_at, c.id, t.actor, t.correlation_id" + keys + ""
            "  JOIN {a}.changes c ON {key} AND c.op <> 'snapshot'"
            "   AND c.table_schema = k.s AND c.table_name = k.n AND c.captured_at >= k.at"
            "  LEFT JOIN {a}.transactions t ON t.id = c.transaction_id"
            " WHERE c.transaction_id <> ALL (%(ids)s)"
            " UNION ALL "
            "SELECT k.i, c.op, c.transaction_id, c.captured_at, c.id, t.actor, t.correlation_id" + keys + ""
            "  JOIN {a}.truncates x ON x.table_schema = k.s AND x.table_name = k.n AND x.captured_at >= k.at"
            "  JOIN {a}.changes c ON {truncate_join}"
            "  LEFT JOIN {a}.transactions t ON t.id = c.transaction_id"
            " WHERE c.transaction_id <> ALL (%(ids)s)"
            " ORDER BY 1, 4 DESC, 5 DESC"
        ).format(a=audit, key=key_condition("k.pk"), truncate_join=truncate_change_join(partitioned=False)),
        params,
    ).fetchall()
    out: list[Conflict] = []
    seen: set[int] = set()
    for f in found:
        if f["i"] in seen:
            continue
        seen.add(f["i"])
        row = rows[f["i"] - 1]
        who = f["actor"]
        by = f" by {who.get('type')}:{who.get('id')}" if isinstance(who, Mapping) and who.get("id") else ""
        corr = f", correlation id {f['correlation_id']}" if f["correlation_id"] else ""
        out.append(
            Conflict(
                row.table.name,
                row.pk,
                f"{'its table was truncated' if f['op'] == 'truncate' else 'changed again (' + f['op'] + ')'} "
                f"at {iso(f['captured_at'])} in transaction {f['transaction_id']}{by}{corr}",
            )
        )
    return out
