"""The order a revert's steps run in: by the foreign keys between the tables touched (parents
inserted first, children deleted first) and those of a table to itself, row by row."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from threadline.explore.revert_records import RevertRow, RevertStep, RevertTable


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


def order_steps(
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
