"""threadline: an audit trail for PostgreSQL apps that run background work on Celery.

PostgreSQL triggers capture every row change; the actor and correlation context set here travels
into each database transaction (and, through Celery, into workers), so every change knows who
caused it and which request it belongs to.
"""

from threadline import celery, ddl
from threadline.actor import ActorRef
from threadline.context import AuditContext, context, current, use_context
from threadline.errors import (
    ConfigurationError,
    InvalidActor,
    InvalidContext,
    InvalidTrackOption,
    NoPrimaryKey,
    SchemaError,
    ThreadlineError,
    TrackingError,
    UnknownColumn,
    UnknownTable,
    UntrustedContext,
)
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

__version__ = "0.1.0"

__all__ = [
    "ActorRef",
    "AuditContext",
    "ConfigurationError",
    "InvalidActor",
    "InvalidContext",
    "InvalidTrackOption",
    "NoPrimaryKey",
    "SchemaError",
    "ThreadlineConnection",
    "ThreadlineCursor",
    "ThreadlineError",
    "TrackingError",
    "UnknownColumn",
    "UnknownTable",
    "UntrustedContext",
    "__version__",
    "apply_context",
    "apply_context_async",
    "celery",
    "context",
    "current",
    "ddl",
    "extract",
    "inject",
    "submit",
    "task",
    "transaction",
    "use_context",
    "wrap",
]
