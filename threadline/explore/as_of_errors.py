"""Why :func:`threadline.as_of` cannot give the row or table as it was: :class:`AsOfError` and
its kinds (the row was deleted, is not known then, or the table had no baseline)."""

from __future__ import annotations

from datetime import datetime

from threadline.core.errors import ThreadlineError
from threadline.core.records import Change

__all__ = ["AsOfError", "NoBaseline", "NotYetAudited", "RowDeleted"]


class AsOfError(ThreadlineError, LookupError):
    """:func:`as_of` cannot give the row as it was at the time asked."""


class RowDeleted(AsOfError):
    """The row had been deleted (or its table truncated) by the time asked.

    ``change`` is the captured delete or truncate; ``deleted_at`` its time.
    """

    def __init__(self, message: str, *, change: Change, deleted_at: datetime) -> None:
        super().__init__(message)
        self.change = change
        self.deleted_at = deleted_at


class NotYetAudited(AsOfError):
    """No captured change of the row is at or before the time asked, so its state then is unknown.

    ``first_change`` is the row's earliest captured change, if it has any (an ``insert`` there
    means the row most likely did not exist yet).
    """

    def __init__(self, message: str, *, first_change: Change | None = None) -> None:
        super().__init__(message)
        self.first_change = first_change


class NoBaseline(AsOfError):
    """The table had no complete baseline in force at the time asked, so rows that had not changed
    since tracking began are unknown: take one with :func:`threadline.take_baseline`."""
