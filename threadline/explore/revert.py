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

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from threadline.core._connection import ConnectionLike, native
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.explore.actions import record_action
from threadline.explore.revert_plan import (
    image_sql,
    key_match,
    plan_revert,
    relation_sql,
    revert_scope,
)
from threadline.explore.revert_records import (
    HiddenColumns,
    RevertConflict,
    RevertError,
    RevertPlan,
    RevertResult,
    RevertRow,
    RevertStep,
    RevertTable,
)
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


def _apply(cur: psycopg.Cursor[Any], row: RevertRow, step: RevertStep) -> None:
    table = row.table
    # values go in as the image's own JSON text, so numbers keep every digit
    params: dict[str, Any] = {"pk": row.pk_text, "row": row.first["before_text"]}
    if step.action == "delete":
        cur.execute(
            sql.SQL("DELETE FROM {} AS t WHERE {}").format(relation_sql(table), key_match(table)), params
        )
    elif step.action == "insert":
        columns, values = _restored(table, step)
        cur.execute(
            sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE {}").format(
                relation_sql(table), columns, values
            ),
            params,
        )
    elif step.values:
        columns, values = _restored(table, step)
        cur.execute(
            sql.SQL("UPDATE {} AS t SET ({}) = ({}) WHERE {}").format(
                relation_sql(table), columns, values, key_match(table)
            ),
            params,
        )
    if step.action != "insert" and cur.rowcount > 1:  # a row with the same key came in since the plan
        raise RevertError(
            f"{table.name} holds more than one row with the key {row.pk_text}: the key columns it is"
            " tracked with are not unique; nothing was reverted"
        )


def _restored(table: RevertTable, step: RevertStep) -> tuple[sql.Composable, sql.Composable]:
    """The columns a step writes, and the ``SELECT`` of their values from the image in ``%(row)s``."""
    cols = [sql.Identifier(c) for c in table.insertable if c in step.values]
    return sql.SQL(", ").join(cols), sql.SQL("SELECT {} FROM json_populate_record(NULL::{}, {}) AS r").format(
        sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in cols),
        relation_sql(table),
        image_sql(table, "row"),
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
    scope = revert_scope(correlation_id, transaction_id, task_id)
    raw, _ = native(conn)
    audit = sql.Identifier(audit_schema)
    try:
        with transaction(raw):
            cur = raw.cursor(row_factory=dict_row)
            cur.execute("SET CONSTRAINTS ALL DEFERRED")
            plan, rows, _ = plan_revert(cur, audit, scope, overwrite, skip_hidden, lock=not dry_run)
            if dry_run:
                raise _DryRun(plan)  # leaves the transaction (or savepoint) rolled back
            action_id = _apply_all(raw, cur, rows, plan, scope, overwrite, audit_schema)
    except _DryRun as planned:
        return RevertResult(planned.plan, applied=False)
    return RevertResult(plan, applied=True, action_id=action_id)


def _apply_all(
    raw: psycopg.Connection[Any],
    cur: psycopg.Cursor[Any],
    rows: list[RevertRow],
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
