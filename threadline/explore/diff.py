"""Field-level view of one captured change."""

from __future__ import annotations

from typing import Any, NamedTuple

from threadline.core.records import Change


class FieldChange(NamedTuple):
    """One field of a change: its name, its value before and its value after.

    For an insert ``before`` is ``None``; for a delete ``after`` is ``None``.
    """

    field: str
    before: Any
    after: Any


def diff(change: Change) -> list[FieldChange]:
    """``[(field, before, after), ...]`` for one change: "what exactly did that update change?".

    - update: the changed fields, in the order captured, with their prior and new values;
    - insert: every field of the new row (``before`` is ``None``);
    - delete: every field of the deleted row (``after`` is ``None``);
    - snapshot (a baseline's record of a row): every field of the row then (``before`` is ``None``);
    - truncate: ``[]`` (no row images are captured).

    Excluded columns are never present; masked ones show the placeholder on both sides.
    """
    before = change.before or {}
    after = change.after or {}
    if change.op == "update":
        fields = (
            change.changed_fields
            if change.changed_fields is not None
            else tuple(f for f, v in before.items() if f not in after or after[f] != v)
        )
        return [FieldChange(f, before.get(f), after.get(f)) for f in fields]
    if change.op in ("insert", "snapshot"):
        return [FieldChange(f, None, v) for f, v in after.items()]
    if change.op == "delete":
        return [FieldChange(f, v, None) for f, v in before.items()]
    return []


def previous_row(change: Change) -> dict[str, Any] | None:
    """The whole row just before ``change``: ``after`` with the changed fields set back to their
    ``before`` values for an update, the deleted row for a delete, ``None`` for an insert."""
    if change.op == "update" and change.after is not None:
        return {**change.after, **(change.before or {})}
    if change.op == "delete" and change.before is not None:
        return dict(change.before)
    return None
