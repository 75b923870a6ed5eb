"""What a maintenance step or an upgrade that takes the audit tables' locks treats as "busy, try again"."""

from __future__ import annotations

from psycopg import errors

TABLES_BUSY: tuple[type[errors.DatabaseError], ...] = (errors.LockNotAvailable, errors.DeadlockDetected)
"""The errors of a lock not granted in time (``lock_timeout``) or of a deadlock with a writer
whose statements take the audit tables in another order: the step's transaction is rolled back,
nothing of it stays, and the step may simply be run again."""

__all__ = ["TABLES_BUSY"]
