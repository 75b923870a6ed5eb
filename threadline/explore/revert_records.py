"""What a revert reports and refuses with: :class:`RevertPlan`, :class:`RevertResult`,
:class:`RevertStep`, :class:`RevertError` and its subclasses; and the tables and rows a plan is
made of."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from threadline.core.errors import ThreadlineError

MASKED = "[masked]"


class RevertError(ThreadlineError):
    """The revert cannot be done as asked; the message says why and what to do."""


class RevertConflict(RevertError):
    """Rows were changed again after the changes being reverted (``conflicts`` names them)."""

    def __init__(self, message: str, conflicts: Sequence[Conflict]) -> None:
        super().__init__(message)
        self.conflicts = tuple(conflicts)


class HiddenColumns(RevertError):
    """Restoring would need values the audit trail does not have: of masked or excluded columns
    (never recorded), values an erasure replaced, or columns the table no longer has."""


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
    """Columns the step leaves as they are (or to their default on insert): masked or excluded,
    erased, or no longer in the table."""

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
class RevertTable:
    regclass: str
    name: str
    keys: tuple[str, ...]
    masked: frozenset[str]
    excluded: frozenset[str]
    columns: tuple[str, ...]
    insertable: tuple[str, ...]
    oid: int
    #: columns whose values are read as their type's output text (name, whether a composite or
    #: an array): a type created in the database may carry a cast to json, which to_json() calls
    #: with the rights of whoever reverts; capture records such values as that text too
    as_text: tuple[tuple[str, bool], ...] = ()


@dataclass
class RevertRow:
    table: RevertTable
    pk: dict[str, Any]
    pk_text: str
    first: dict[str, Any]
    last: dict[str, Any]
    changed: set[str] = field(default_factory=set)
    masked_changed: bool = False
