"""threadline: an audit trail for PostgreSQL apps that run background work on Celery.

PostgreSQL triggers capture every row change; the actor and correlation context set here travels
into each database transaction (and, through Celery, into workers), so every change knows who
caused it and which request it belongs to.
"""

from typing import TYPE_CHECKING, Any

from threadline import ddl
from threadline.actions import list_actions, list_actions_async, record_action, record_action_async
from threadline.actor import ActorRef
from threadline.as_of_query import AsOfError, NoBaseline, NotYetAudited, RowDeleted, as_of, as_of_async
from threadline.baseline import Baseline, BaselineProgress, baselines, take_baseline
from threadline.context import AuditContext, context, current, use_context
from threadline.diff import FieldChange, diff
from threadline.errors import (
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
from threadline.export import ExportResult, export, export_async
from threadline.propagation.carrier import extract, inject
from threadline.propagation.executors import submit, wrap
from threadline.propagation.psycopg import (
    ThreadlineConnection,
    ThreadlineCursor,
    apply_context,
    apply_context_async,
    transaction,
)
from threadline.query import (
    actor_history,
    actor_history_async,
    changes_for_transaction,
    changes_for_transaction_async,
    history,
    history_async,
    trace,
    trace_async,
)
from threadline.records import Action, Change, TaskRun, Transaction
from threadline.revert import HiddenColumns, RevertConflict, RevertError, RevertPlan, RevertResult, revert
from threadline.timeline_query import TimelinePage, timeline, timeline_async
from threadline.tracing import Trace, TraceNode, TraceTransaction

if TYPE_CHECKING:
    from threadline import celery
    from threadline.propagation.celery import task


def __getattr__(name: str) -> Any:
    # Celery is imported on first use (threadline.celery, threadline.task): a web process that
    # never publishes a task does not pay for importing it.
    if name == "celery":
        import threadline.celery as celery_module

        return celery_module
    if name == "task":
        from threadline.propagation.celery import task as task_decorator

        return task_decorator
    raise AttributeError(f"module 'threadline' has no attribute {name!r}")


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
