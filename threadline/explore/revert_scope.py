"""What a revert covers: the scope it is given (a correlation id, a transaction or a task),
checked, and the statements finding the transactions of each kind of scope."""

from __future__ import annotations

from typing import Any

from threadline.core.errors import InvalidFilter


def revert_scope(
    correlation_id: str | None, transaction_id: int | None, task_id: str | None
) -> dict[str, Any]:
    """The one scope named, as ``{kind: value}``; :class:`InvalidFilter` unless exactly one is
    named and its value is valid."""
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


SCOPE_SQL = {
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
"""For each kind of scope, the statement listing its transactions' ids (``{a}``: the audit schema,
``%(v)s``: the scope's value)."""
