"""Exception hierarchy for threadline.

Every error threadline raises on purpose is a subclass of :class:`ThreadlineError`, so callers can
catch the whole family with one ``except`` clause or pick out the specific case they handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


class ThreadlineError(Exception):
    """Base class of every error threadline raises on purpose."""


class InvalidContext(ThreadlineError, ValueError):
    """An audit context (or one of its fields) is malformed, too large or not encodable.

    ``field`` names the offending field (``"actor"``, ``"correlation_id"``, ``"meta"``, ...).
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"invalid audit context field {field!r}: {problem}")


class InvalidActor(InvalidContext):
    """An actor reference is malformed (bad type, missing id, unparsable ``type:id`` text)."""

    def __init__(self, problem: str) -> None:
        super().__init__("actor", problem)


class SchemaError(ThreadlineError):
    """The audit schema is missing, too old, or its name is not acceptable."""


class TrackingError(ThreadlineError):
    """A table cannot be tracked or untracked as asked."""


class UnknownTable(TrackingError):
    """The named table does not exist (or is not a plain or partitioned table)."""


class NoPrimaryKey(TrackingError):
    """The table has no primary key and no key columns were given."""


class UnknownColumn(TrackingError):
    """A column named in an option does not exist on the table."""


class InvalidTrackOption(TrackingError):
    """Tracking options contradict each other or target the audit tables themselves."""


class QueryError(ThreadlineError, ValueError):
    """An argument of a query, export or action call is invalid (raised before any row is read)."""


class InvalidFilter(QueryError):
    """A filter is malformed: a naive datetime, ``since`` after ``until``, an unknown operation,
    a limit out of range, an unknown export format."""


class InvalidKey(QueryError):
    """A primary-key value does not fit the table's key (scalar for a composite key, wrong columns)."""


class InvalidCursor(QueryError):
    """A pagination cursor is not one this library issued, or belongs to a different query."""


class TableNotFound(QueryError):
    """A table named in a query is neither in the database catalog nor in the audit data."""


class InvalidAction(QueryError):
    """An action's fields are malformed (empty name, over-long text, meta that is not JSON)."""


class UntrustedContext(InvalidContext):
    """An incoming audit context carries no valid signature while signing keys are configured.

    Raised in a Celery task whose signature policy is ``"reject"`` (the task body does not run),
    and by :func:`threadline.extract` when ``signing_keys`` are given.
    """

    def __init__(self, problem: str) -> None:
        super().__init__("sig", problem)
        self.args = (problem,)  # rebuilt as UntrustedContext(problem) from a result backend

    def __str__(self) -> str:
        return f"untrusted audit context: {self.problem}"


class ConfigurationError(ThreadlineError, ValueError):
    """An option passed to a threadline set-up call is not acceptable (the message says which)."""


class RetentionError(ThreadlineError, ValueError):
    """A purge was asked for with unacceptable arguments (a bad age, batch size or table), or on a
    connection inside an open transaction (each batch must be its own short transaction)."""


class CoverageError(ThreadlineError, ValueError):
    """A coverage check was asked for with unacceptable arguments (an unparsable table name or
    window)."""


class PrivilegeError(ThreadlineError):
    """The role named for least-privilege set-up does not exist or cannot be configured."""
