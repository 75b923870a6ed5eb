"""Planning a revert (:func:`plan_revert`): the rows a scope touched, folded per row to the state
before its first change, checked for later changes and hidden columns, and ordered by the foreign
keys between the tables. Applying the plan is :func:`threadline.explore.revert.revert`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import InvalidFilter
from threadline.core.records import exact_json, iso
from threadline.ddl.names import qualified_name
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


def revert_scope(
    correlation_id: str | None, transaction_id: int | None, task_id: str | None
) -> dict[str, Any]:
    given = {
        k: v
        for k, v in (
            ("correlation_id", correlation_id),
            ("transaction_id", transaction_id),
            ("task_id", task_id),
        )
        if v is not None
    }
    if len(given) != 1:
        raise InvalidFilter("name exactly one of correlation_id, transaction_id or task_id")
    for key, value in given.items():
        if key == "transaction_id":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidFilter(f"transaction_id must be a positive integer, got {value!r}")
        elif not isinstance(value, str) or not value or len(value) > 256:
            raise InvalidFilter(f"{key} must be a non-empty text of at most 256 characters, got {value!r}")
    return given


_SCOPE_SQL = {
    "correlation_id": "SELECT t.id FROM {a}.transactions t WHERE t.correlation_id = %(v)s",
    "transaction_id": "SELECT t.id FROM {a}.transactions t WHERE t.id = %(v)s",
    # the task's transactions (every attempt), and those of the tasks it started, at any depth
    "task_id": """
        WITH RECURSIVE tasks(id) AS (
            SELECT %(v)s::text
            UNION
            SELECT c.id FROM tasks, LATERAL (
                SELECT t.job ->> 'id' FROM {a}.transactions t
                 WHERE (t.job ->> 'parent_id' = tasks.id OR t.causation_id = tasks.id) AND t.job ->> 'id' IS NOT NULL
                UNION
                -- recorded task runs also know the tasks that wrote nothing themselves
                SELECT r.task_id FROM {a}.task_runs r WHERE r.parent_id = tasks.id OR r.causation_id = tasks.id
            ) AS c(id)
        )
        SELECT t.id FROM {a}.transactions t WHERE t.job ->> 'id' IN (SELECT id FROM tasks)""",
}


def _key_text(pk: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in pk.items())


def _tables(
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
                " t.key_columns, t.mask, t.exclude,"
                " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0"
                "        AND NOT a.attisdropped ORDER BY a.attnum) AS columns,"
                " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0"
                "        AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum) AS insertable"
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
        out[(schema, name)] = RevertTable(
            regclass=info["regclass"],
            name=qualified_name(info["s"], info["n"]),
            keys=tuple(info["key_columns"]),
            masked=frozenset(info["mask"]) & frozenset(info["columns"]),
            excluded=frozenset(info["exclude"]) & frozenset(info["columns"]),
            columns=tuple(info["columns"]),
            insertable=tuple(info["insertable"]),
            oid=row["oid"],
        )
    return out


def relation_sql(table: RevertTable) -> sql.Composable:
    # the name as the catalog gives it, each part quoted by format('%I.%I')
    return sql.SQL(table.regclass)


def key_match(table: RevertTable, alias: str = "t") -> sql.Composable:
    """``(t.k1, t.k2) = (SELECT r.k1, r.k2 FROM json_populate_record(NULL::tbl, %(pk)s) r)``."""
    cols = [sql.Identifier(k) for k in table.keys]
    return sql.SQL("({}) = (SELECT {} FROM json_populate_record(NULL::{}, %(pk)s::json) AS r)").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), c) for c in cols),
        sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols),
        relation_sql(table),
    )


def _current(cur: psycopg.Cursor[Any], table: RevertTable, pk_text: str, lock: bool) -> dict[str, Any] | None:
    statement = sql.SQL("SELECT to_json(t)::text AS row FROM {} AS t WHERE {}{}").format(
        relation_sql(table), key_match(table), sql.SQL(" FOR UPDATE") if lock else sql.SQL("")
    )
    row = cur.execute(statement, {"pk": pk_text}).fetchone()
    return None if row is None else dict(exact_json(row["row"]))


def image_sql(table: RevertTable, param: str) -> sql.Composable:
    """The image in parameter ``param`` without its masked and excluded keys, as json.

    A masked value is the text ``[masked]``, which a column of another type (a date, a number)
    cannot take: the image is read into the table's row type only without them."""
    return sql.SQL(
        "(SELECT coalesce(json_object_agg(e.key, e.value), '{{}}') FROM json_each({}::json) AS e"
        " WHERE e.key <> ALL ({}::text[]))"
    ).format(sql.Placeholder(param), sql.Literal(sorted(table.masked | table.excluded)))


def _rendered(cur: psycopg.Cursor[Any], table: RevertTable, image_text: str | None) -> dict[str, Any]:
    """A captured image's visible values as this session renders the table's columns now.

    Images are text made in the capturing session (a ``timestamptz`` in its time zone, say):
    read back into the row type, they compare with the current row by value, not by spelling."""
    row = cur.execute(
        sql.SQL("SELECT to_json(r)::text AS row FROM json_populate_record(NULL::{}, {}) AS r").format(
            relation_sql(table), image_sql(table, "image")
        ),
        {"image": image_text or "{}"},
    ).fetchone()
    assert row is not None
    shown = _visible(table, exact_json(image_text) or {})
    return {k: v for k, v in exact_json(row["row"]).items() if k in shown}


def _visible(table: RevertTable, image: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in image.items()
        if k not in table.masked and k not in table.excluded and k in table.columns
    }


def _fk_order(cur: psycopg.Cursor[Any], tables: Sequence[RevertTable]) -> list[RevertTable]:
    """Tables parents first (a table referenced by another comes before it); cycles keep their order."""
    oids = [t.oid for t in tables]
    edges = cur.execute(
        "SELECT DISTINCT conrelid::oid AS child, confrelid::oid AS parent FROM pg_constraint"
        " WHERE contype = 'f' AND conrelid = ANY (%(o)s) AND confrelid = ANY (%(o)s) AND conrelid <> confrelid",
        {"o": oids},
    ).fetchall()
    parents: dict[int, set[int]] = {o: set() for o in oids}
    for e in edges:
        parents[e["child"]].add(e["parent"])
    by_oid = {t.oid: t for t in tables}
    done: list[int] = []
    remaining = sorted(oids, key=lambda o: by_oid[o].name)
    while remaining:
        ready = [o for o in remaining if parents[o] <= set(done)] or remaining[:1]
        done.append(ready[0])
        remaining.remove(ready[0])
    return [by_oid[o] for o in done]


def plan_revert(
    cur: psycopg.Cursor[Any],
    audit: sql.Identifier,
    scope: dict[str, Any],
    overwrite: bool,
    skip_hidden: bool,
    lock: bool,
) -> tuple[RevertPlan, list[RevertRow], dict[tuple[str, str], RevertTable]]:
    key, value = next(iter(scope.items()))
    ids = [r["id"] for r in cur.execute(sql.SQL(_SCOPE_SQL[key]).format(a=audit), {"v": value}).fetchall()]
    if not ids:
        raise RevertError(f"no transaction recorded for {key} {value}")
    changes = cur.execute(
        sql.SQL(
            "SELECT c.id, c.transaction_id, c.table_schema, c.table_name, c.op,"
            " c.pk::text AS pk_text, c.before::text AS before_text, c.after::text AS after_text,"
            " coalesce(c.changed_fields, {a}.changed_fields(c.before, c.after)) AS changed, c.captured_at"
            "  FROM {a}.changes c WHERE c.transaction_id = ANY (%(ids)s) AND c.op <> 'snapshot'"
            " ORDER BY c.captured_at, c.id"
        ).format(a=audit),
        {"ids": ids},
    ).fetchall()
    if not changes:
        raise RevertError(f"the transactions of {key} {value} changed no tracked row: nothing to revert")
    truncates = [c for c in changes if c["op"] == "truncate"]
    if truncates:
        t = truncates[0]
        raise RevertError(
            f"{qualified_name(t['table_schema'], t['table_name'])} was truncated at {iso(t['captured_at'])} "
            "by these changes: a truncate cannot be reverted row by row (restore the table from its "
            "baseline with threadline as-of, or from a backup)"
        )
    tables = _tables(cur, audit, ((c["table_schema"], c["table_name"]) for c in changes))
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
        target = None if row.first["op"] == "insert" else _rendered(cur, table, row.first["before_text"])
        left = None if row.last["op"] == "delete" else _rendered(cur, table, row.last["after_text"])
        now = _current(cur, table, row.pk_text, lock)
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
        if target is None and now is not None:
            steps.append((row, RevertStep(table.name, row.pk, "delete", {}, now)))
        elif target is not None and now is None:
            values = _visible(table, target)
            if hidden:
                hidden_needed.append(
                    f"{table.name} ({_key_text(row.pk)}): insert again without {', '.join(hidden)}"
                )
            steps.append(
                (row, RevertStep(table.name, row.pk, "insert", values, None, hidden if hidden else ()))
            )
        elif target is not None and now is not None:
            values = {k: v for k, v in _visible(table, target).items() if now.get(k) != v}
            masked = tuple(sorted(row.changed & table.masked)) if row.masked_changed else ()
            if masked:
                hidden_needed.append(
                    f"{table.name} ({_key_text(row.pk)}): update of masked {', '.join(masked)}"
                )
            if values or masked:
                steps.append((row, RevertStep(table.name, row.pk, "update", values, now, masked)))
    if table_excluded := sorted({t.name for t in tables.values() if t.excluded}):
        notes.append(
            f"excluded columns of {', '.join(table_excluded)} were never recorded: changes to them are not reverted"
        )
    ordered = _ordered(cur, steps, tables)
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
            "the revert would need values of masked or excluded columns, which were never recorded:\n"
            + "\n".join(f"  {h}" for h in hidden_needed)
            + "\nrevert with skip_hidden=True (--skip-hidden) to leave those columns as they are "
            "(their defaults for a row inserted again)"
        )
    return plan, [r for r, _ in ordered], tables


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
    # the rows' own later changes (through the index on pk), then truncates of their tables
    # (through the index of truncates): two statements, so each keeps its index
    found = cur.execute(
        sql.SQL(
            "SELECT k.i, c.op, c.transaction_id, c.captured_at, c.id, t.actor, t.correlation_id" + keys + ""
            "  JOIN {a}.changes c ON c.pk = k.pk AND c.op <> 'snapshot'"
            "   AND c.table_schema = k.s AND c.table_name = k.n AND c.captured_at >= k.at"
            "  LEFT JOIN {a}.transactions t ON t.id = c.transaction_id"
            " WHERE c.transaction_id <> ALL (%(ids)s)"
            " UNION ALL "
            "SELECT k.i, c.op, c.transaction_id, c.captured_at, c.id, t.actor, t.correlation_id" + keys + ""
            "  JOIN {a}.changes c ON c.op = 'truncate'"
            "   AND c.table_schema = k.s AND c.table_name = k.n AND c.captured_at >= k.at"
            "  LEFT JOIN {a}.transactions t ON t.id = c.transaction_id"
            " WHERE c.transaction_id <> ALL (%(ids)s)"
            " ORDER BY 1, 4 DESC, 5 DESC"
        ).format(a=audit),
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


def _ordered(
    cur: psycopg.Cursor[Any],
    steps: list[tuple[RevertRow, RevertStep]],
    tables: Mapping[tuple[str, str], RevertTable],
) -> list[tuple[RevertRow, RevertStep]]:
    """Inserts parents first, then updates, then deletes children first; within a table, inserts
    in the order the rows first changed and deletes in the reverse order, except that a row
    another one of the table references (a foreign key of the table to itself) is inserted before
    it and deleted after it."""
    order = _fk_order(cur, list({t.oid: t for t in tables.values()}.values()))
    rank = {t.regclass: i for i, t in enumerate(order)}

    def when(item: tuple[RevertRow, RevertStep]) -> tuple[datetime, int]:
        return item[0].first["captured_at"], item[0].first["id"]

    inserts = sorted(
        (s for s in steps if s[1].action == "insert"), key=lambda s: (rank[s[0].table.regclass], when(s))
    )
    updates = sorted(
        (s for s in steps if s[1].action == "update"), key=lambda s: (rank[s[0].table.regclass], when(s))
    )
    deletes = sorted((s for s in steps if s[1].action == "delete"), key=when, reverse=True)
    deletes.sort(key=lambda s: -rank[s[0].table.regclass])
    for table in order:
        refs = _self_references(cur, table)
        if refs:
            inserts = _parents_first(inserts, table, refs, lambda s: s[1].values)
            deletes = _parents_first(deletes[::-1], table, refs, lambda s: s[1].current or {})[::-1]
    return inserts + updates + deletes


def _self_references(cur: psycopg.Cursor[Any], table: RevertTable) -> list[tuple[list[str], list[str]]]:
    """The table's foreign keys to itself: (referencing columns, referenced columns)."""
    columns = (
        "ARRAY(SELECT a.attname::text FROM unnest(c.{k}) WITH ORDINALITY AS k(n, i) JOIN pg_attribute a"
        " ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i)"
    )
    found = cur.execute(
        f"SELECT {columns.format(k='conkey')} AS cols, {columns.format(k='confkey')} AS refs"
        "  FROM pg_constraint c WHERE c.contype = 'f' AND c.conrelid = %(o)s AND c.confrelid = %(o)s",
        {"o": table.oid},
    ).fetchall()
    return [(r["cols"], r["refs"]) for r in found]


def _parents_first(
    items: list[tuple[RevertRow, RevertStep]],
    table: RevertTable,
    refs: list[tuple[list[str], list[str]]],
    image: Callable[[tuple[RevertRow, RevertStep]], Mapping[str, Any]],
) -> list[tuple[RevertRow, RevertStep]]:
    """``items`` with ``table``'s rows reordered so that each comes after the rows of the table it
    references through ``refs`` (by the values ``image`` gives); otherwise (and in a cycle) in
    the order given. Other tables' rows keep their places."""
    places = [i for i, item in enumerate(items) if item[0].table.regclass == table.regclass]
    mine = [items[i] for i in places]

    def key(values: Mapping[str, Any], cols: list[str]) -> str:
        return json.dumps([values.get(c) for c in cols], default=str)

    referenced: dict[tuple[int, str], list[int]] = {}
    for i, item in enumerate(mine):
        for r, (_, ref_cols) in enumerate(refs):
            referenced.setdefault((r, key(image(item), ref_cols)), []).append(i)
    parents: list[list[int]] = []
    for i, item in enumerate(mine):
        values = image(item)
        parents.append(
            sorted(
                {
                    p
                    for r, (cols, _) in enumerate(refs)
                    if all(values.get(c) is not None for c in cols)
                    for p in referenced.get((r, key(values, cols)), ())
                    if p != i
                }
            )
        )
    state = [0] * len(mine)  # 0: not yet, 1: its parents being placed, 2: placed
    placed: list[int] = []
    for start in range(len(mine)):
        stack = [start]
        while stack:
            i = stack[-1]
            if state[i] == 0:
                state[i] = 1
                stack.extend(p for p in reversed(parents[i]) if state[p] == 0)
                continue
            stack.pop()
            if state[i] == 1:
                state[i] = 2
                placed.append(i)
    out = list(items)
    for place, i in zip(places, placed, strict=True):
        out[place] = mine[i]
    return out
