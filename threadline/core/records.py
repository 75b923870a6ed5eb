"""Typed, immutable records read back from the audit tables: :class:`Transaction`,
:class:`Change` and :class:`Action`.

Every datetime is timezone-aware and in UTC. JSON columns come back as plain Python values
(typed as read-only mappings); :meth:`to_dict` gives the JSON-compatible form used by the CLI and
by exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from threadline.core.actor import ActorRef
from threadline.core.json_text import loads_whole

OPS = ("insert", "update", "delete", "truncate", "snapshot")
"""The operations a change can record (``snapshot``: a row recorded by a baseline)."""


def utc(value: datetime) -> datetime:
    """``value`` (timezone-aware) converted to UTC."""
    return value.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 text in UTC with microseconds and a ``Z`` suffix (``None`` stays ``None``)."""
    if value is None:
        return None
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The C scanner behind json.loads, without its per-call whitespace handling: PostgreSQL's JSON
# text has none around the value.
def float_or_exact(text: str) -> float | Decimal:
    """A JSON number with a fraction or an exponent: a ``float`` when one holds it exactly as
    written (``1.5``, ``0.1``, ``12.50``), else a ``Decimal`` (a ``numeric`` of more digits than a
    float keeps, or beyond its range), so that no value is shown rounded or as another value."""
    value = float(text)
    if len(text) <= 16 and "e" not in text and "E" not in text:
        return value  # at most 15 digits, no exponent: a float holds it
    exact = Decimal(text)
    if value in (float("inf"), float("-inf")) or (value == 0.0 and exact != 0):
        return exact
    return value if Decimal(repr(value)) == exact else exact


_DECODER = json.JSONDecoder(parse_float=float_or_exact)
_scan: Callable[[str, int], tuple[Any, int]] = vars(_DECODER)["scan_once"]
_decode = _DECODER.decode


def from_json(value: Any) -> Any:
    """A JSON column's value: parsed when it arrives as text (the queries select JSON as text,
    which is parsed once per distinct transaction instead of once per row)."""
    if not isinstance(value, str):
        return value
    try:
        try:
            parsed, end = _scan(value, 0)
        except StopIteration:
            return _decode(value)
        return parsed if end == len(value) else _decode(value)
    except (ValueError, RecursionError):  # a long integer, or nesting too deep (see json_text)
        return loads_whole(value, parse_float=float_or_exact)


def exact_json(text: str | None) -> Any:
    """JSON text as Python values with every number exact (``Decimal`` for a fraction, so a
    numeric column's value is never rounded through a float); ``None`` for ``None``."""
    if text is None:
        return None
    try:
        return json.loads(text, parse_float=Decimal)
    except (ValueError, RecursionError):  # a long integer, or nesting too deep (see json_text)
        return loads_whole(text, parse_float=Decimal)


def _actor(value: Any) -> ActorRef | None:
    return None if value is None else ActorRef.from_dict(from_json(value))


@dataclass(frozen=True)
class Transaction:
    """One database transaction that changed a tracked table, with the context it ran under."""

    id: int
    xid: int
    """``pg_current_xact_id()`` of the transaction."""
    occurred_at: datetime
    """When the transaction started."""
    actor: ActorRef | None
    correlation_id: str | None
    request_id: str | None
    causation_id: str | None
    """The request or task that directly caused this unit of work."""
    origin: str | None
    job: Mapping[str, Any] | None
    """Background-job details: ``name``, ``id``, ``retries``, ``parent_id``, ``root_id``."""
    action_id: int | None
    meta: Mapping[str, Any] | None
    context_error: str | None
    """Why the context set for the transaction was refused (``None`` when valid or absent)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any], prefix: str = "") -> Transaction:
        """Build from a row whose transaction columns are named ``prefix + column``."""
        return cls(
            id=row[prefix + "id"],
            xid=int(row[prefix + "xid"]),
            occurred_at=utc(row[prefix + "occurred_at"]),
            actor=_actor(row[prefix + "actor"]),
            correlation_id=row[prefix + "correlation_id"],
            request_id=row[prefix + "request_id"],
            causation_id=row[prefix + "causation_id"],
            origin=row[prefix + "origin"],
            job=from_json(row[prefix + "job"]),
            action_id=row[prefix + "action_id"],
            meta=from_json(row[prefix + "meta"]),
            context_error=row[prefix + "context_error"],
        )

    @property
    def job_id(self) -> str | None:
        """The background job's id, if this transaction ran in one."""
        value = self.job.get("id") if self.job else None
        return None if value is None else str(value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (times as ISO 8601 UTC text)."""
        return {
            "id": self.id,
            "xid": self.xid,
            "occurred_at": iso(self.occurred_at),
            "actor": None if self.actor is None else self.actor.to_dict(),
            "correlation_id": self.correlation_id,
            "request_id": self.request_id,
            "causation_id": self.causation_id,
            "origin": self.origin,
            "job": None if self.job is None else dict(self.job),
            "action_id": self.action_id,
            "meta": None if self.meta is None else dict(self.meta),
            "context_error": self.context_error,
        }


@dataclass(frozen=True)
class Change:
    """One captured row change (or a table truncate), with its transaction's context."""

    id: int
    transaction_id: int
    table_schema: str
    table_name: str
    op: str
    """``insert``, ``update``, ``delete`` or ``truncate``."""
    pk: Mapping[str, Any] | None
    """All key columns (``None`` for a truncate)."""
    after: Mapping[str, Any] | None
    """The row after the change (``None`` for delete and truncate)."""
    before: Mapping[str, Any] | None
    """The whole row before the change (update and delete). For an update it is ``after`` with the
    changed columns' old values: the stored image holds only those when the statement changed more
    than one row (and in changes recorded before schema version 7)."""
    changed_fields: tuple[str, ...] | None
    captured_at: datetime
    transaction: Transaction | None
    """The transaction the change belongs to (``None`` only if its row was purged)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any], transaction: Transaction | None) -> Change:
        """Build from a row of :data:`threadline.explore.query` change columns."""
        fields = row["changed_fields"]
        after, before = from_json(row["after"]), from_json(row["before"])
        return cls(
            id=row["id"],
            transaction_id=row["transaction_id"],
            table_schema=row["table_schema"],
            table_name=row["table_name"],
            op=row["op"],
            pk=from_json(row["pk"]),
            after=after,
            before={**after, **before}
            if row["op"] == "update" and isinstance(after, dict) and isinstance(before, dict)
            else before,
            changed_fields=None if fields is None else tuple(fields),
            captured_at=utc(row["captured_at"]),
            transaction=transaction,
        )

    @property
    def table(self) -> str:
        """``schema.table``."""
        return f"{self.table_schema}.{self.table_name}"

    @property
    def elapsed(self) -> timedelta | None:
        """Time from the start of the transaction to this change's capture."""
        if self.transaction is None:
            return None
        return self.captured_at - self.transaction.occurred_at

    def to_dict(self, *, with_transaction: bool = True) -> dict[str, Any]:
        """JSON-compatible form; the transaction is nested under ``"transaction"``."""
        out: dict[str, Any] = {
            "id": self.id,
            "transaction_id": self.transaction_id,
            "captured_at": iso(self.captured_at),
            "table_schema": self.table_schema,
            "table_name": self.table_name,
            "op": self.op,
            "pk": None if self.pk is None else dict(self.pk),
            "changed_fields": None if self.changed_fields is None else list(self.changed_fields),
            "before": None if self.before is None else dict(self.before),
            "after": None if self.after is None else dict(self.after),
        }
        if with_transaction:
            out["transaction"] = None if self.transaction is None else self.transaction.to_dict()
        return out


@dataclass(frozen=True)
class Action:
    """A semantic "who did what and why" event recorded with :func:`threadline.record_action`."""

    id: int
    name: str
    actor: ActorRef | None
    status: str
    verb: str | None
    category: str | None
    reason: str | None
    comment: str | None
    correlation_id: str | None
    request_id: str | None
    job_id: str | None
    meta: Mapping[str, Any] | None
    inserted_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Action:
        """Build from a row of ``actions``."""
        return cls(
            id=row["id"],
            name=row["name"],
            actor=_actor(row["actor"]),
            status=row["status"],
            verb=row["verb"],
            category=row["category"],
            reason=row["reason"],
            comment=row["comment"],
            correlation_id=row["correlation_id"],
            request_id=row["request_id"],
            job_id=row["job_id"],
            meta=row["meta"],
            inserted_at=utc(row["inserted_at"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (times as ISO 8601 UTC text)."""
        return {
            "id": self.id,
            "name": self.name,
            "actor": None if self.actor is None else self.actor.to_dict(),
            "status": self.status,
            "verb": self.verb,
            "category": self.category,
            "reason": self.reason,
            "comment": self.comment,
            "correlation_id": self.correlation_id,
            "request_id": self.request_id,
            "job_id": self.job_id,
            "meta": None if self.meta is None else dict(self.meta),
            "inserted_at": iso(self.inserted_at),
        }


@dataclass(frozen=True)
class TaskRun:
    """One attempt of a Celery task as the worker recorded it when the attempt ended (see
    ``threadline.celery.install(record_task_runs=...)``)."""

    id: int
    task_id: str
    name: str | None
    attempt: int
    """Celery's ``request.retries`` for this attempt (0 for the first)."""
    outcome: str
    """``succeeded``, ``failed``, ``retried``, ``rejected`` or ``ignored``."""
    error: str | None
    """``ExceptionType: message`` for a failed or retried attempt."""
    correlation_id: str | None
    causation_id: str | None
    parent_id: str | None
    root_id: str | None
    actor: ActorRef | None
    worker: str | None
    started_at: datetime | None
    ended_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskRun:
        """Build from a row of ``task_runs``."""
        started = row["started_at"]
        return cls(
            id=row["id"],
            task_id=row["task_id"],
            name=row["name"],
            attempt=row["attempt"],
            outcome=row["outcome"],
            error=row["error"],
            correlation_id=row["correlation_id"],
            causation_id=row["causation_id"],
            parent_id=row["parent_id"],
            root_id=row["root_id"],
            actor=_actor(row["actor"]),
            worker=row["worker"],
            started_at=None if started is None else utc(started),
            ended_at=utc(row["ended_at"]),
        )

    @property
    def duration(self) -> timedelta | None:
        """How long the attempt ran (``None`` when its start is unknown)."""
        return None if self.started_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (times as ISO 8601 UTC text)."""
        return {
            "id": self.id,
            "task_id": self.task_id,
            "name": self.name,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "error": self.error,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "parent_id": self.parent_id,
            "root_id": self.root_id,
            "actor": None if self.actor is None else self.actor.to_dict(),
            "worker": self.worker,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
        }
