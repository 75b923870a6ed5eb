"""The trace tree of one correlation id (:class:`Trace`, :class:`TraceNode`,
:class:`TraceTransaction`) and its text rendering.

:func:`threadline.explore.query.trace` loads the rows and :func:`threadline.explore.trace_build.build_trace`
arranges them into this tree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from threadline.core.actor import ActorRef
from threadline.core.printable import one_line
from threadline.core.records import Action, Change, TaskRun, Transaction, iso

REQUEST = "request"
TASK = "task"
WORK = "work"


@dataclass(frozen=True)
class TraceTransaction:
    """A transaction in a trace, with its changes in capture order."""

    transaction: Transaction
    changes: tuple[Change, ...]

    @property
    def started_at(self) -> datetime:
        """When the transaction started."""
        return self.transaction.occurred_at

    @property
    def ended_at(self) -> datetime:
        """When its last change was captured (its start if it has none)."""
        return max((c.captured_at for c in self.changes), default=self.transaction.occurred_at)

    @property
    def duration(self) -> timedelta:
        """From the transaction's start to its last captured change."""
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {
            "transaction": self.transaction.to_dict(),
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "changes": [c.to_dict(with_transaction=False) for c in self.changes],
        }


@dataclass(frozen=True)
class TraceNode:
    """A unit of work in a trace: a web ``request``, a Celery ``task`` or other ``work``."""

    kind: str
    """``request``, ``task`` or ``work`` (transactions with neither a job nor a request id)."""
    id: str | None
    """The request id, the task id, or (for ``work``) the causation id."""
    name: str | None
    """The task name (``None`` for requests and for tasks known only as a parent)."""
    origin: str | None
    actor: ActorRef | None
    attempts: tuple[int, ...]
    """The ``job.retries`` values seen for a task (``(0, 1)``: it ran twice)."""
    transactions: tuple[TraceTransaction, ...]
    actions: tuple[Action, ...]
    children: tuple[TraceNode, ...]
    started_at: datetime | None
    """Start of this node's own first transaction (``None`` if it wrote nothing)."""
    ended_at: datetime | None
    """Last change captured in this node's own transactions."""
    span_started_at: datetime | None
    """Start of the earliest work in this node and everything under it."""
    span_ended_at: datetime | None
    """End of the latest work in this node and everything under it."""
    runs: tuple[TaskRun, ...] = ()
    """A task's recorded attempts, in attempt order (empty when runs are not recorded)."""

    @property
    def outcome(self) -> str | None:
        """The outcome of a task's last recorded attempt (``None`` when none was recorded)."""
        return self.runs[-1].outcome if self.runs else None

    @property
    def duration(self) -> timedelta | None:
        """Own duration: first transaction start to last captured change."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def change_count(self) -> int:
        """Changes in this node's own transactions."""
        return sum(len(t.changes) for t in self.transactions)

    def walk(self) -> Iterator[TraceNode]:
        """This node and every node under it, depth first."""
        stack = [self]
        while stack:  # a loop: a chain of thousands of tasks makes a tree as deep
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form, children nested."""
        top = self._own_dict()
        stack = [(self, top)]
        while stack:
            node, shown = stack.pop()
            for child in node.children:
                nested = child._own_dict()
                shown["children"].append(nested)
                stack.append((child, nested))
        return top

    def _own_dict(self) -> dict[str, Any]:
        """The JSON-compatible form of this node, its children still to add."""
        return {
            "kind": self.kind,
            "id": self.id,
            "name": self.name,
            "origin": self.origin,
            "actor": None if self.actor is None else self.actor.to_dict(),
            "attempts": list(self.attempts),
            "outcome": self.outcome,
            "runs": [r.to_dict() for r in self.runs],
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "span_started_at": iso(self.span_started_at),
            "span_ended_at": iso(self.span_ended_at),
            "transactions": [t.to_dict() for t in self.transactions],
            "actions": [a.to_dict() for a in self.actions],
            "children": [],
        }


@dataclass(frozen=True)
class Trace:
    """Everything one correlation id caused, as a tree (see :func:`threadline.trace`)."""

    correlation_id: str
    roots: tuple[TraceNode, ...]
    actions: tuple[Action, ...]
    """Actions with this correlation id that belong to no node."""
    started_at: datetime | None
    ended_at: datetime | None
    transaction_count: int
    change_count: int

    @property
    def empty(self) -> bool:
        """True when nothing was recorded for the correlation id."""
        return not self.roots and not self.actions

    @property
    def duration(self) -> timedelta | None:
        """From the first transaction's start to the last captured change."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def walk(self) -> Iterator[TraceNode]:
        """Every node, depth first."""
        for root in self.roots:
            yield from root.walk()

    @property
    def task_count(self) -> int:
        """Number of task nodes."""
        return sum(1 for n in self.walk() if n.kind == TASK)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {
            "correlation_id": self.correlation_id,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "transaction_count": self.transaction_count,
            "change_count": self.change_count,
            "roots": [r.to_dict() for r in self.roots],
            "actions": [a.to_dict() for a in self.actions],
        }

    def render(self, *, max_changes: int | None = 10) -> str:
        """The tree as text, one line per node, transaction, action and change.

        Offsets (``+1.204s``) are from the start of the trace; durations follow them. At most
        ``max_changes`` changes are listed per transaction (``None``: all).
        """
        return render(self, max_changes=max_changes)


# ---------------------------------------------------------------------------------------------
# Rendering


def format_duration(value: timedelta | None) -> str:
    """``12.3ms`` below a second, ``1.204s`` above; ``-`` when unknown."""
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.3f}s"


def format_key(pk: Mapping[str, Any] | None) -> str:
    """``id=7`` or ``order_id=7,line_no=2``; empty for a truncate."""
    if not pk:
        return ""
    return one_line(",".join(f"{k}={v}" for k, v in pk.items()))


def _offset(at: datetime | None, origin: datetime | None) -> str:
    if at is None or origin is None:
        return ""
    return f"+{(at - origin).total_seconds():.3f}s"


def _join(*parts: str | None) -> str:
    return "  ".join(p for p in parts if p)


def _node_line(node: TraceNode, origin: datetime | None) -> str:
    if node.kind == TASK:
        label = f"task {node.name or '(unknown name)'} [{node.id}]"
    elif node.kind == REQUEST:
        label = f"request {node.id}"
    else:
        label = f"{node.name or 'work'}" + (f" caused by {node.id}" if node.id else "")
    attempts = ""
    if len(node.attempts) > 1:
        attempts = f"{len(node.attempts)} attempts"
    elif node.attempts and node.attempts[0] > 0:
        attempts = f"retry {node.attempts[0]}"
    outcome = node.outcome
    if not node.transactions:
        return _join(
            label,
            outcome,
            attempts,
            "(no audited writes)",
            _offset(node.span_started_at, origin),
        )
    return _join(
        label,
        outcome,
        node.origin if node.kind != WORK else None,
        None if node.actor is None else str(node.actor),
        attempts,
        _offset(node.started_at, origin),
        format_duration(node.duration),
    )


def _run_line(run: TaskRun, origin: datetime | None) -> str:
    return _join(
        f"attempt {run.attempt + 1} {run.outcome}",
        _offset(run.started_at, origin),
        format_duration(run.duration),
        run.error,
        None if run.worker is None else f"on {run.worker}",
    )


def _tx_line(item: TraceTransaction, node: TraceNode, origin: datetime | None) -> str:
    tx = item.transaction
    count = len(item.changes)
    retry = None
    if node.kind == TASK and len(node.attempts) > 1 and tx.job is not None:
        retry = f"attempt {int(tx.job.get('retries') or 0) + 1}"
    return _join(
        f"tx {tx.id}",
        retry,
        _offset(item.started_at, origin),
        format_duration(item.duration),
        f"{count} change{'s' if count != 1 else ''}",
        f"action {tx.action_id}" if tx.action_id is not None else None,
        f"context error: {tx.context_error}" if tx.context_error else None,
    )


def _change_line(change: Change) -> str:
    fields = ", ".join(change.changed_fields) if change.op == "update" and change.changed_fields else None
    return _join(f"{change.op:<6} {change.table} {format_key(change.pk)}".rstrip(), fields)


def _action_line(action: Action, origin: datetime | None) -> str:
    return _join(
        f"action {action.name} ({action.status})",
        None if action.actor is None else str(action.actor),
        action.reason,
        _offset(action.inserted_at, origin),
    )


def render(trace: Trace, *, max_changes: int | None = 10) -> str:
    """Text rendering of a :class:`Trace` (see :meth:`Trace.render`)."""
    origin = trace.started_at
    tasks = trace.task_count
    lines = [
        _join(
            f"correlation {trace.correlation_id}",
            f"{trace.transaction_count} transaction{'s' if trace.transaction_count != 1 else ''}",
            f"{trace.change_count} change{'s' if trace.change_count != 1 else ''}",
            f"{tasks} task{'s' if tasks != 1 else ''}",
            format_duration(trace.duration),
        )
    ]

    def items(node: TraceNode) -> list[tuple[datetime | None, int, object]]:
        out: list[tuple[datetime | None, int, object]] = []
        if len(node.runs) > 1 or any(r.outcome != "succeeded" for r in node.runs):
            out.extend((r.started_at or r.ended_at, -1, r) for r in node.runs)
        out.extend((t.started_at, 0, t) for t in node.transactions)
        out.extend((a.inserted_at, 1, a) for a in node.actions)
        out.extend((c.span_started_at, 2, c) for c in node.children)
        out.sort(key=lambda x: (x[0] is None, x[0] or origin or datetime.min, x[1]))
        return out

    # depth first, in a loop: a chain of thousands of tasks makes a tree as deep; each entry is
    # what to write, the node it belongs to, the prefix of its line, whether it is the last
    # under that node, and whether it is a root
    stack: list[tuple[object, TraceNode | None, str, bool, bool]] = [
        (root, None, "", True, True) for root in reversed(trace.roots)
    ]
    while stack:
        obj, node, prefix, last, top = stack.pop()
        branch = "" if top else ("└─ " if last else "├─ ")
        inner = prefix + ("" if top else ("   " if last else "│  "))
        if isinstance(obj, TraceNode):
            lines.append(prefix + branch + _node_line(obj, origin))
            parts = [sub for _, _, sub in items(obj)]
            stack.extend(
                (sub, obj, inner, n == len(parts) - 1, False) for n, sub in reversed(list(enumerate(parts)))
            )
        elif isinstance(obj, TraceTransaction):
            assert node is not None
            lines.append(prefix + branch + _tx_line(obj, node, origin))
            shown = obj.changes if max_changes is None else obj.changes[:max_changes]
            hidden = len(obj.changes) - len(shown)
            for n, change in enumerate(shown):
                end = n == len(shown) - 1 and not hidden
                lines.append(inner + ("└─ " if end else "├─ ") + _change_line(change))
            if hidden:
                lines.append(inner + f"└─ … {hidden} more change{'s' if hidden != 1 else ''}")
        elif isinstance(obj, Action):
            lines.append(prefix + branch + _action_line(obj, origin))
        elif isinstance(obj, TaskRun):
            lines.append(prefix + branch + _run_line(obj, origin))
    for action in trace.actions:
        lines.append(_action_line(action, origin))
    # each line is one line whatever the captured text holds (a table name or a reason with a
    # line break would otherwise start a forged line)
    return "\n".join(one_line(line) for line in lines) + "\n"
