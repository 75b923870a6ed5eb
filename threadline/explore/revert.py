"""Undo what a request, a transaction or a task did: :func:`revert`.

The changes in scope (every transaction of a correlation id, one transaction, or a Celery task's
transactions, all its attempts and the tasks it started) are folded per row: the row's state
before the first of them (absent for a row they inserted, else that change's before image) is
the target. Each row is then brought from what it holds now to its target: a row they inserted is
deleted, a row they deleted is inserted again, a row they updated gets back the columns that
differ. Everything runs in one transaction, rows locked first, inserts parents first and deletes
children first (by the foreign keys between the tables touched, and those of a table to itself);
deferrable constraints are deferred to its end.

A row changed again after the changes being reverted (a captured change outside the scope, a
truncate of its table, or a current value that differs from what the scope left) is a conflict:
the revert is refused, naming the row and the later change, unless ``overwrite=True``. Masked
columns cannot be restored (their values were never recorded) and excluded ones were never
recorded at all: a revert that would need them (an update of a masked column, a row to insert
again into a table with masked or excluded columns) is refused unless ``skip_hidden=True``, which
leaves them as they are (or to their defaults on insert).

The revert's own transaction is captured like any other, under the current audit context (so it
names whoever runs it), and linked to a ``threadline.revert`` action whose ``meta`` names the scope
and the transactions reverted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from threadline.core._connection import ConnectionLike, native
from threadline.core.errors import InvalidFilter, ThreadlineError
from threadline.core.records import exact_json, iso
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name, qualified_name
from threadline.explore.actions import record_action
from threadline.propagation.psycopg import transaction

__all__ = [
    "HiddenColumns",
    "RevertConflict",
    "RevertError",
    "RevertPlan",
    "RevertResult",
    "RevertStep",
    "revert",
]

MASKED = "[masked]"


class RevertError(ThreadlineError):
    """The revert cannot be done as asked; the message says why and what to do."""


class RevertConflict(RevertError):
    """Rows were changed again after the changes being reverted (``conflicts`` names them)."""

    def __init__(self, message: str, conflicts: Sequence[Conflict]) -> None:
        super().__init__(message)
        self.conflicts = tuple(conflicts)


class HiddenColumns(RevertError):
    """Restoring would need values of masked or excluded columns, which were never recorded."""


@dataclass(frozen=True)
class Conflict:
    """A row changed after the changes being reverted."""

    table: str
    pk: Mapping[str, Any]
    detail: str


@dataclass(frozen=True)
class RevertStep:
    """What the revert does to one row."""

    table: str
    """The table, schema-qualified, as it is named now."""
    pk: Mapping[str, Any]
    action: str
    """``delete``, ``insert`` or ``update``."""
    values: Mapping[str, Any]
    """Insert: the row to insert; update: the columns restored and their values."""
    current: Mapping[str, Any] | None
    """The row as it is now (``None`` when absent)."""
    hidden: tuple[str, ...] = ()
    """Masked or excluded columns the step leaves as they are (or to their default on insert)."""

    def render(self) -> str:
        """One line (or a few) of the diff."""
        key = ", ".join(f"{k}={v}" for k, v in self.pk.items())
        head = f"{self.table} ({key})"
        note = f"  [not restored: {', '.join(self.hidden)}]" if self.hidden else ""
        if self.action == "delete":
            return f"- {head}: delete (a row the reverted changes inserted){note}"
        if self.action == "insert":
            return f"+ {head}: insert again {json.dumps(dict(self.values), ensure_ascii=False, default=str)}{note}"
        now = self.current or {}
        parts = [
            f"{col}: {json.dumps(now.get(col), ensure_ascii=False, default=str)} -> "
            f"{json.dumps(value, ensure_ascii=False, default=str)}"
            for col, value in self.values.items()
        ]
        return f"~ {head}: " + "; ".join(parts) + note


@dataclass(frozen=True)
class RevertPlan:
    """What a revert does: its steps in the order they run, and what it found on the way."""

    scope: Mapping[str, Any]
    transaction_ids: tuple[int, ...]
    """The transactions whose changes are reverted."""
    changes: int
    steps: tuple[RevertStep, ...]
    conflicts: tuple[Conflict, ...] = ()
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        """The plan as a diff: ``-`` delete, ``+`` insert, ``~`` update (now -> restored)."""
        scope = ", ".join(f"{k} {v}" for k, v in self.scope.items())
        tables = len({s.table for s in self.steps})
        lines = [
            f"revert of {scope}: {len(self.steps)} row(s) in {tables} table(s) "
            f"({self.changes} change(s) in {len(self.transaction_ids)} transaction(s))"
        ]
        lines += [s.render() for s in self.steps]
        lines += [
            f"! {c.table} ({', '.join(f'{k}={v}' for k, v in c.pk.items())}): {c.detail}"
            for c in self.conflicts
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class RevertResult:
    """A revert done (or, with ``dry_run``, only planned)."""

    plan: RevertPlan
    applied: bool
    action_id: int | None = None
    """The ``threadline.revert`` action its transaction links to."""


@dataclass
class _Table:
    regclass: str
    name: str
    keys: tuple[str, ...]
    masked: frozenset[str]
    excluded: frozenset[str]
    columns: tuple[str, ...]
    insertable: tuple[str, ...]
    oid: int


@dataclass
class _Row:
    table: _Table
    pk: dict[str, Any]
    pk_text: str
    first: dict[str, Any]
    last: dict[str, Any]
    changed: set[str] = field(default_factory=set)
    masked_changed: bool = False


def _scope(correlation_id: str | None, transaction_id: int | None, task_id: str | None) -> dict[str, Any]:
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
) -> dict[tuple[str, str], _Table]:
    """The table each captured name stands for now (through the registry of names, then the catalog)."""
    out: dict[tuple[str, str], _Table] = {}
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
        out[(schema, name)] = _Table(
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


def _relation(table: _Table) -> sql.Composable:
    # the name as the catalog gives it, each part quoted by format('%I.%I')
    return sql.SQL(table.regclass)


def _key_match(table: _Table, alias: str = "t") -> sql.Composable:
    """``(t.k1, t.k2) = (SELECT r.k1, r.k2 FROM json_populate_record(NULL::tbl, %(pk)s) r)``."""
    cols = [sql.Identifier(k) for k in table.keys]
    return sql.SQL("({}) = (SELECT {} FROM json_populate_record(NULL::{}, %(pk)s::json) AS r)").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), c) for c in cols),
        sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols),
        _relation(table),
    )


def _current(cur: psycopg.Cursor[Any], table: _Table, pk_text: str, lock: bool) -> dict[str, Any] | None:
    statement = sql.SQL("SELECT to_json(t)::text AS row FROM {} AS t WHERE {}{}").format(
        _relation(table), _key_match(table), sql.SQL(" FOR UPDATE") if lock else sql.SQL("")
    )
    row = cur.execute(statement, {"pk": pk_text}).fetchone()
    return None if row is None else dict(exact_json(row["row"]))


def _image(table: _Table, param: str) -> sql.Composable:
    """The image in parameter ``param`` without its masked and excluded keys, as json.

    A masked value is the text ``[masked]``, which a column of another type (a date, a number)
    cannot take: the image is read into the table's row type only without them."""
    return sql.SQL(
        "(SELECT coalesce(json_object_agg(e.key, e.value), '{{}}') FROM json_each({}::json) AS e"
        " WHERE e.key <> ALL ({}::text[]))"
    ).format(sql.Placeholder(param), sql.Literal(sorted(table.masked | table.excluded)))


def _rendered(cur: psycopg.Cursor[Any], table: _Table, image_text: str | None) -> dict[str, Any]:
    """A captured image's visible values as this session renders the table's columns now.

    Images are text made in the capturing session (a ``timestamptz`` in its time zone, say):
    read back into the row type, they compare with the current row by value, not by spelling."""
    row = cur.execute(
        sql.SQL("SELECT to_json(r)::text AS row FROM json_populate_record(NULL::{}, {}) AS r").format(
            _relation(table), _image(table, "image")
        ),
        {"image": image_text or "{}"},
    ).fetchone()
    assert row is not None
    shown = _visible(table, exact_json(image_text) or {})
    return {k: v for k, v in exact_json(row["row"]).items() if k in shown}


def _visible(table: _Table, image: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in image.items()
        if k not in table.masked and k not in table.excluded and k in table.columns
    }


def _fk_order(cur: psycopg.Cursor[Any], tables: Sequence[_Table]) -> list[_Table]:
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


def _plan(
    cur: psycopg.Cursor[Any],
    audit: sql.Identifier,
    scope: dict[str, Any],
    overwrite: bool,
    skip_hidden: bool,
    lock: bool,
) -> tuple[RevertPlan, list[_Row], dict[tuple[str, str], _Table]]:
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
    rows: dict[tuple[str, str], _Row] = {}
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
            row = rows[row_key] = _Row(table, pk, c["pk_text"], c, c)
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
    steps: list[tuple[_Row, RevertStep]] = []
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
    cur: psycopg.Cursor[Any], audit: sql.Identifier, ids: list[int], rows: Iterable[_Row]
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
    cur: psycopg.Cursor[Any], steps: list[tuple[_Row, RevertStep]], tables: Mapping[tuple[str, str], _Table]
) -> list[tuple[_Row, RevertStep]]:
    """Inserts parents first, then updates, then deletes children first; within a table, inserts
    in the order the rows first changed and deletes in the reverse order, except that a row
    another one of the table references (a foreign key of the table to itself) is inserted before
    it and deleted after it."""
    order = _fk_order(cur, list({t.oid: t for t in tables.values()}.values()))
    rank = {t.regclass: i for i, t in enumerate(order)}

    def when(item: tuple[_Row, RevertStep]) -> tuple[datetime, int]:
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


def _self_references(cur: psycopg.Cursor[Any], table: _Table) -> list[tuple[list[str], list[str]]]:
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
    items: list[tuple[_Row, RevertStep]],
    table: _Table,
    refs: list[tuple[list[str], list[str]]],
    image: Callable[[tuple[_Row, RevertStep]], Mapping[str, Any]],
) -> list[tuple[_Row, RevertStep]]:
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


def _apply(cur: psycopg.Cursor[Any], row: _Row, step: RevertStep) -> None:
    table = row.table
    # values go in as the image's own JSON text, so numbers keep every digit
    params: dict[str, Any] = {"pk": row.pk_text, "row": row.first["before_text"]}
    if step.action == "delete":
        cur.execute(
            sql.SQL("DELETE FROM {} AS t WHERE {}").format(_relation(table), _key_match(table)), params
        )
    elif step.action == "insert":
        columns, values = _restored(table, step)
        cur.execute(
            sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE {}").format(
                _relation(table), columns, values
            ),
            params,
        )
    elif step.values:
        columns, values = _restored(table, step)
        cur.execute(
            sql.SQL("UPDATE {} AS t SET ({}) = ({}) WHERE {}").format(
                _relation(table), columns, values, _key_match(table)
            ),
            params,
        )


def _restored(table: _Table, step: RevertStep) -> tuple[sql.Composable, sql.Composable]:
    """The columns a step writes, and the ``SELECT`` of their values from the image in ``%(row)s``."""
    cols = [sql.Identifier(c) for c in table.insertable if c in step.values]
    return sql.SQL(", ").join(cols), sql.SQL("SELECT {} FROM json_populate_record(NULL::{}, {}) AS r").format(
        sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols), _relation(table), _image(table, "row")
    )


def revert(
    conn: ConnectionLike,
    *,
    correlation_id: str | None = None,
    transaction_id: int | None = None,
    task_id: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    skip_hidden: bool = False,
    audit_schema: str = DEFAULT_SCHEMA,
) -> RevertResult:
    """Undo the changes of a request (``correlation_id``), one audit ``transaction_id``, or a
    Celery ``task_id`` (its attempts and the tasks it started), in one transaction.

    ``dry_run`` computes and returns the plan (``result.plan.render()`` shows it as a diff) and
    changes nothing. Raises :class:`RevertConflict` when a row was changed after those changes
    (``overwrite=True`` replaces the later changes too) and :class:`HiddenColumns` when restoring
    would need masked or excluded values (``skip_hidden=True`` leaves those columns as they are).
    The revert is captured under the current audit context and linked to a ``threadline.revert``
    action that names what it reverted.
    """
    check_schema_name(audit_schema)
    scope = _scope(correlation_id, transaction_id, task_id)
    raw, _ = native(conn)
    audit = sql.Identifier(audit_schema)
    try:
        with transaction(raw):
            cur = raw.cursor(row_factory=dict_row)
            cur.execute("SET CONSTRAINTS ALL DEFERRED")
            plan, rows, _ = _plan(cur, audit, scope, overwrite, skip_hidden, lock=not dry_run)
            if dry_run:
                raise _DryRun(plan)  # leaves the transaction (or savepoint) rolled back
            action_id = _apply_all(raw, cur, rows, plan, scope, overwrite, audit_schema)
    except _DryRun as planned:
        return RevertResult(planned.plan, applied=False)
    return RevertResult(plan, applied=True, action_id=action_id)


def _apply_all(
    raw: psycopg.Connection[Any],
    cur: psycopg.Cursor[Any],
    rows: list[_Row],
    plan: RevertPlan,
    scope: Mapping[str, Any],
    overwrite: bool,
    audit_schema: str,
) -> int:
    for row, step in zip(rows, plan.steps, strict=True):
        _apply(cur, row, step)
    action = record_action(
        raw,
        "threadline.revert",
        verb="revert",
        category="threadline",
        meta={
            "reverted": dict(scope),
            "transactions": list(plan.transaction_ids),
            "rows": len(plan.steps),
            "overwrite": overwrite,
        },
        audit_schema=audit_schema,
    )
    return action.id


class _DryRun(Exception):
    def __init__(self, plan: RevertPlan) -> None:
        super().__init__("dry run")
        self.plan = plan
