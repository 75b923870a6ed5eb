"""Building the trace tree of one correlation id from its rows.

:func:`threadline.explore.query.trace` loads the rows; :func:`build_trace` arranges them: the web request
(transactions without a job, grouped by request id) at the top, each Celery task (transactions
whose ``job`` names a task id, every retry of a task in the same node) under the task or request
that caused it, each unit's transactions under it, each transaction's changes under it.

A task's parent is found, in order, from Celery's ``job.parent_id``, the ``causation_id`` (the
publishing task, or the web request that published it) and ``job.root_id``. A parent that wrote
nothing itself (a chain step without database writes, a request that only published a task) still
appears, as a node without transactions, so the shape of the story is kept.

Where the worker records task runs (``threadline.celery.install(record_task_runs=...)``), each
task node also lists its attempts with their outcome, and tasks that wrote nothing (or whose
writes rolled back) appear under their cause with their name.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from threadline.core.actor import ActorRef
from threadline.core.records import Action, Change, TaskRun, Transaction
from threadline.explore.tracing import REQUEST, TASK, WORK, Trace, TraceNode, TraceTransaction

# ---------------------------------------------------------------------------------------------
# Building


@dataclass(eq=False)
class _Node:
    kind: str
    id: str | None
    name: str | None = None
    origin: str | None = None
    actor: ActorRef | None = None
    attempts: set[int] = field(default_factory=set)
    transactions: list[TraceTransaction] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    runs: list[TaskRun] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)
    parent: _Node | None = None
    refs: dict[str, str] = field(default_factory=dict)


def _text(job: Mapping[str, Any] | None, key: str) -> str | None:
    value = job.get(key) if job else None
    return None if value is None or value == "" else str(value)


def _key(tx: Transaction) -> tuple[str, str | None]:
    job_id = _text(tx.job, "id")
    if job_id is not None:
        return TASK, job_id
    if tx.request_id is not None:
        return REQUEST, tx.request_id
    return WORK, f"{tx.origin or ''}\x00{tx.causation_id or ''}"


def _would_cycle(child: _Node, parent: _Node) -> bool:
    node: _Node | None = parent
    while node is not None:
        if node is child:
            return True
        node = node.parent
    return False


def _attach(child: _Node, parent: _Node) -> bool:
    if parent is child or _would_cycle(child, parent):
        return False
    child.parent = parent
    parent.children.append(child)
    return True


def build_trace(
    correlation_id: str,
    transactions: Iterable[Transaction],
    changes: Iterable[Change],
    actions: Iterable[Action] = (),
    runs: Iterable[TaskRun] = (),
) -> Trace:
    """Arrange the transactions, changes, actions and task runs of one correlation id into a
    :class:`Trace`."""
    by_tx: dict[int, list[Change]] = {}
    for change in changes:
        by_tx.setdefault(change.transaction_id, []).append(change)
    nodes: dict[tuple[str, str | None], _Node] = {}
    order: list[_Node] = []
    for tx in sorted(transactions, key=lambda t: (t.occurred_at, t.id)):
        kind, ident = _key(tx)
        node = nodes.get((kind, ident))
        if node is None:
            shown = tx.causation_id if kind == WORK else ident
            node = nodes[(kind, ident)] = _Node(kind, shown)
            order.append(node)
        node.transactions.append(
            TraceTransaction(tx, tuple(sorted(by_tx.get(tx.id, ()), key=lambda c: c.id)))
        )
        node.name = node.name or (
            _text(tx.job, "name") if kind == TASK else tx.origin if kind == WORK else None
        )
        node.origin = node.origin or tx.origin
        node.actor = node.actor or tx.actor
        if kind == TASK and tx.job is not None:
            retries = tx.job.get("retries")
            node.attempts.add(retries if isinstance(retries, int) and not isinstance(retries, bool) else 0)
        parent = _text(tx.job, "parent_id")
        for ref, value in (
            # a retried or replaced task names itself as its parent: that says nothing
            ("parent_id", None if parent == ident else parent),
            ("root_id", _text(tx.job, "root_id")),
            ("causation_id", tx.causation_id),
            ("request_id", tx.request_id),
        ):
            if value is not None:
                node.refs.setdefault(ref, value)

    for run in sorted(runs, key=lambda r: (r.ended_at, r.id)):
        node = nodes.get((TASK, run.task_id))
        if node is None:
            node = nodes[(TASK, run.task_id)] = _Node(TASK, run.task_id, origin="celery")
            order.append(node)
        # a task's attempts in attempt order: with a thread pool, an attempt retried without a
        # countdown can end (and be recorded) after the next attempt has
        bisect.insort(node.runs, run, key=lambda r: (r.attempt, r.ended_at, r.id))
        node.name = node.name or run.name
        node.actor = node.actor or run.actor
        node.attempts.add(run.attempt)
        for ref, value in (
            ("parent_id", None if run.parent_id == run.task_id else run.parent_id),
            ("root_id", run.root_id),
            ("causation_id", run.causation_id),
        ):
            if value is not None:
                node.refs.setdefault(ref, value)

    def placeholder(kind: str, ident: str) -> _Node:
        node = nodes.get((kind, ident))
        if node is None:
            node = nodes[(kind, ident)] = _Node(kind, ident)
            order.append(node)
        return node

    # Parents. The list grows while it is walked: placeholders get their turn too, after the
    # children that created them, whose references they borrow.
    i = 0
    while i < len(order):
        node = order[i]
        i += 1
        if not node.transactions:
            for child in node.children:
                for ref in ("root_id", "request_id"):
                    value = child.refs.get(ref)
                    if value is not None and value != node.id:
                        node.refs.setdefault(ref, value)
        refs = node.refs
        parent_id, root_id = refs.get("parent_id"), refs.get("root_id")
        causation, request_id = refs.get("causation_id"), refs.get("request_id")
        candidates: list[_Node | None] = []
        if node.kind == TASK:
            if parent_id is not None:
                candidates.append(placeholder(TASK, parent_id))
            if causation is not None:
                candidates.append(nodes.get((TASK, causation)))
                if parent_id is None and (TASK, causation) not in nodes:
                    # published outside any task: by the request (or process) named here
                    candidates.append(placeholder(REQUEST, causation))
            if root_id is not None:
                candidates.append(nodes.get((TASK, root_id)))
            if request_id is not None:
                candidates.append(nodes.get((REQUEST, request_id)))
        elif causation is not None:
            candidates.append(nodes.get((TASK, causation)))
            candidates.append(nodes.get((REQUEST, causation)))
        for candidate in candidates:
            if candidate is not None and _attach(node, candidate):
                break

    by_action = {
        t.transaction.action_id: n
        for n in order
        for t in n.transactions
        if t.transaction.action_id is not None
    }
    loose_actions: list[Action] = []
    for action in actions:
        owner = by_action.get(action.id)
        if owner is None and action.job_id is not None:
            owner = nodes.get((TASK, action.job_id))
        if owner is None and action.request_id is not None:
            owner = nodes.get((REQUEST, action.request_id))
        if owner is None:
            loose_actions.append(action)
        else:
            owner.actions.append(action)
    loose = tuple(loose_actions)

    roots = tuple(sorted(_freeze_all([n for n in order if n.parent is None]), key=_start_key))
    starts = [r.span_started_at for r in roots if r.span_started_at is not None]
    ends = [r.span_ended_at for r in roots if r.span_ended_at is not None]
    tx_count = sum(len(n.transactions) for n in order)
    change_count = sum(len(t.changes) for n in order for t in n.transactions)
    return Trace(
        correlation_id=correlation_id,
        roots=roots,
        actions=loose,
        started_at=min(starts, default=None),
        ended_at=max(ends, default=None),
        transaction_count=tx_count,
        change_count=change_count,
    )


def _start_key(node: TraceNode) -> tuple[bool, datetime | str]:
    return (node.span_started_at is None, node.span_started_at or "")


def _freeze_all(roots: list[_Node]) -> list[TraceNode]:
    """The trees under ``roots`` frozen, each node after its children: in a loop, as a chain of
    thousands of tasks makes a tree as deep."""
    frozen: dict[int, TraceNode] = {}
    stack = [(node, False) for node in roots]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            frozen[id(node)] = _freeze(node, [frozen[id(c)] for c in node.children])
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in node.children)
    return [frozen[id(node)] for node in roots]


def _freeze(node: _Node, frozen_children: list[TraceNode]) -> TraceNode:
    children = tuple(sorted(frozen_children, key=_start_key))
    txs = tuple(sorted(node.transactions, key=lambda t: (t.started_at, t.transaction.id)))
    started = min((t.started_at for t in txs), default=None)
    ended = max((t.ended_at for t in txs), default=None)
    action_times = [a.inserted_at for a in node.actions]
    run_starts = [r.started_at or r.ended_at for r in node.runs]
    run_ends = [r.ended_at for r in node.runs]
    span_starts = [
        t
        for t in [started, *action_times, *run_starts, *(c.span_started_at for c in children)]
        if t is not None
    ]
    span_ends = [
        t for t in [ended, *action_times, *run_ends, *(c.span_ended_at for c in children)] if t is not None
    ]
    return TraceNode(
        kind=node.kind,
        id=node.id,
        name=node.name,
        origin=node.origin,
        actor=node.actor,
        attempts=tuple(sorted(node.attempts)),
        transactions=txs,
        actions=tuple(sorted(node.actions, key=lambda a: (a.inserted_at, a.id))),
        children=children,
        started_at=started,
        ended_at=ended,
        span_started_at=min(span_starts, default=None),
        span_ended_at=max(span_ends, default=None),
        runs=tuple(node.runs),
    )
