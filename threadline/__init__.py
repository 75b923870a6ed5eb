"""threadline: an audit trail for PostgreSQL apps that run background work on Celery.

PostgreSQL triggers capture every row change; the actor and correlation context set here travels
into each database transaction (and, through Celery, into workers), so every change knows who
caused it and which request it belongs to.

Every public name below is imported on first use: ``import threadline`` loads neither psycopg nor
Celery, Django or SQLAlchemy, so a process pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from threadline import celery, ddl
    from threadline.core.actor import ActorRef
    from threadline.core.context import AuditContext, context, current, use_context
    from threadline.core.errors import (
        ConfigurationError,
        InvalidAction,
        InvalidActor,
        InvalidContext,
        InvalidCursor,
        InvalidFilter,
        InvalidKey,
        InvalidTrackOption,
        NoPrimaryKey,
        QueryError,
        SchemaError,
        TableNotFound,
        ThreadlineError,
        TrackingError,
        UnknownColumn,
        UnknownTable,
        UntrustedContext,
    )
    from threadline.core.records import Action, Change, TaskRun, Transaction
    from threadline.explore.actions import (
        list_actions,
        list_actions_async,
        record_action,
        record_action_async,
    )
    from threadline.explore.as_of_query import (
        AsOfError,
        NoBaseline,
        NotYetAudited,
        RowDeleted,
        as_of,
        as_of_async,
    )
    from threadline.explore.diff import FieldChange, diff
    from threadline.explore.export import export, export_async
    from threadline.explore.export_rows import ExportResult
    from threadline.explore.query import (
        actor_history,
        actor_history_async,
        changes_for_transaction,
        changes_for_transaction_async,
        history,
        history_async,
        trace,
        trace_async,
    )
    from threadline.explore.revert import (
        HiddenColumns,
        RevertConflict,
        RevertError,
        RevertPlan,
        RevertResult,
        revert,
    )
    from threadline.explore.timeline_query import TimelinePage, timeline, timeline_async
    from threadline.explore.tracing import Trace, TraceNode, TraceTransaction
    from threadline.ops.baseline import Baseline, BaselineProgress, baselines, take_baseline
    from threadline.propagation.carrier import extract, inject
    from threadline.propagation.celery import task
    from threadline.propagation.executors import submit, wrap
    from threadline.propagation.psycopg import (
        ThreadlineConnection,
        ThreadlineCursor,
        apply_context,
        apply_context_async,
        transaction,
    )

# where each public name lives; its module is imported when the name is first used
_EXPORTS: dict[str, str] = {
    "Action": "threadline.core.records",
    "ActorRef": "threadline.core.actor",
    "AsOfError": "threadline.explore.as_of_query",
    "AuditContext": "threadline.core.context",
    "Baseline": "threadline.ops.baseline",
    "BaselineProgress": "threadline.ops.baseline",
    "Change": "threadline.core.records",
    "ConfigurationError": "threadline.core.errors",
    "ExportResult": "threadline.explore.export_rows",
    "FieldChange": "threadline.explore.diff",
    "HiddenColumns": "threadline.explore.revert",
    "InvalidAction": "threadline.core.errors",
    "InvalidActor": "threadline.core.errors",
    "InvalidContext": "threadline.core.errors",
    "InvalidCursor": "threadline.core.errors",
    "InvalidFilter": "threadline.core.errors",
    "InvalidKey": "threadline.core.errors",
    "InvalidTrackOption": "threadline.core.errors",
    "NoBaseline": "threadline.explore.as_of_query",
    "NoPrimaryKey": "threadline.core.errors",
    "NotYetAudited": "threadline.explore.as_of_query",
    "QueryError": "threadline.core.errors",
    "RevertConflict": "threadline.explore.revert",
    "RevertError": "threadline.explore.revert",
    "RevertPlan": "threadline.explore.revert",
    "RevertResult": "threadline.explore.revert",
    "RowDeleted": "threadline.explore.as_of_query",
    "SchemaError": "threadline.core.errors",
    "TableNotFound": "threadline.core.errors",
    "TaskRun": "threadline.core.records",
    "ThreadlineConnection": "threadline.propagation.psycopg",
    "ThreadlineCursor": "threadline.propagation.psycopg",
    "ThreadlineError": "threadline.core.errors",
    "TimelinePage": "threadline.explore.timeline_query",
    "Trace": "threadline.explore.tracing",
    "TraceNode": "threadline.explore.tracing",
    "TraceTransaction": "threadline.explore.tracing",
    "TrackingError": "threadline.core.errors",
    "Transaction": "threadline.core.records",
    "UnknownColumn": "threadline.core.errors",
    "UnknownTable": "threadline.core.errors",
    "UntrustedContext": "threadline.core.errors",
    "actor_history": "threadline.explore.query",
    "actor_history_async": "threadline.explore.query",
    "apply_context": "threadline.propagation.psycopg",
    "apply_context_async": "threadline.propagation.psycopg",
    "as_of": "threadline.explore.as_of_query",
    "as_of_async": "threadline.explore.as_of_query",
    "baselines": "threadline.ops.baseline",
    "changes_for_transaction": "threadline.explore.query",
    "changes_for_transaction_async": "threadline.explore.query",
    "context": "threadline.core.context",
    "current": "threadline.core.context",
    "diff": "threadline.explore.diff",
    "export": "threadline.explore.export",
    "export_async": "threadline.explore.export",
    "extract": "threadline.propagation.carrier",
    "history": "threadline.explore.query",
    "history_async": "threadline.explore.query",
    "inject": "threadline.propagation.carrier",
    "list_actions": "threadline.explore.actions",
    "list_actions_async": "threadline.explore.actions",
    "record_action": "threadline.explore.actions",
    "record_action_async": "threadline.explore.actions",
    "revert": "threadline.explore.revert",
    "submit": "threadline.propagation.executors",
    "take_baseline": "threadline.ops.baseline",
    "timeline": "threadline.explore.timeline_query",
    "timeline_async": "threadline.explore.timeline_query",
    "trace": "threadline.explore.query",
    "trace_async": "threadline.explore.query",
    "transaction": "threadline.propagation.psycopg",
    "use_context": "threadline.core.context",
    "wrap": "threadline.propagation.executors",
    "task": "threadline.propagation.celery",
}

_SUBMODULES = frozenset({"celery", "ddl"})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"threadline.{name}")
    else:
        raise AttributeError(f"module 'threadline' has no attribute {name!r}")
    globals()[name] = value  # later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActorRef",
    "AsOfError",
    "AuditContext",
    "Baseline",
    "BaselineProgress",
    "Change",
    "ConfigurationError",
    "ExportResult",
    "FieldChange",
    "HiddenColumns",
    "InvalidAction",
    "InvalidActor",
    "InvalidContext",
    "InvalidCursor",
    "InvalidFilter",
    "InvalidKey",
    "InvalidTrackOption",
    "NoBaseline",
    "NoPrimaryKey",
    "NotYetAudited",
    "QueryError",
    "RevertConflict",
    "RevertError",
    "RevertPlan",
    "RevertResult",
    "RowDeleted",
    "SchemaError",
    "TableNotFound",
    "TaskRun",
    "ThreadlineConnection",
    "ThreadlineCursor",
    "ThreadlineError",
    "TimelinePage",
    "Trace",
    "TraceNode",
    "TraceTransaction",
    "TrackingError",
    "Transaction",
    "UnknownColumn",
    "UnknownTable",
    "UntrustedContext",
    "__version__",
    "actor_history",
    "actor_history_async",
    "apply_context",
    "apply_context_async",
    "as_of",
    "as_of_async",
    "baselines",
    "celery",
    "changes_for_transaction",
    "changes_for_transaction_async",
    "context",
    "current",
    "ddl",
    "diff",
    "export",
    "export_async",
    "extract",
    "history",
    "history_async",
    "inject",
    "list_actions",
    "list_actions_async",
    "record_action",
    "record_action_async",
    "revert",
    "submit",
    "take_baseline",
    "task",
    "timeline",
    "timeline_async",
    "trace",
    "trace_async",
    "transaction",
    "use_context",
    "wrap",
]
