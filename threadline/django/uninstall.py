"""``migrate`` back past :class:`~threadline.django.operations.InstallAudit` is refused before
anything is unapplied while the audit schema holds audit rows.

Django unapplies the migrations that depend on the install first (their ``Untrack`` operations
run, their tables change back) and reverses the install last, where the audit schema's own
refusal would leave the project half-reverted. The ``pre_migrate`` receiver here (connected by
``threadline.apps.ThreadlineConfig``) runs the same test as the reversal, on the database being
migrated, before the first migration of the plan is unapplied.

Imported by Django only; see ``docs/django.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router

from threadline.ddl.uninstall import refuse_with_rows_sql
from threadline.django.operations import InstallAudit

__all__ = ["refuse_uninstall_with_rows"]

_HOLDS_ROWS = "2BP01"  # dependent_objects_still_exist: what the refusal raises


def _reversed_schemas(plan: Iterable[tuple[Any, bool]], alias: str) -> list[str]:
    """The audit schemas that ``plan`` reverses an install of in database ``alias``."""
    schemas: list[str] = []
    for migration, backwards in plan:
        if not backwards or not router.allow_migrate(alias, migration.app_label):
            continue
        for operation in migration.operations:
            if isinstance(operation, InstallAudit) and operation.audit_schema not in schemas:
                schemas.append(operation.audit_schema)
    return schemas


def refuse_uninstall_with_rows(
    sender: Any = None, using: str = DEFAULT_DB_ALIAS, plan: Any = None, **_: Any
) -> None:
    """``pre_migrate`` receiver: raise ``CommandError`` (with the reversal's message and hint)
    when the migration ``plan`` reverses an ``InstallAudit`` in database ``using`` whose audit
    schema holds audit rows. Nothing has been unapplied then. A schema without rows (or none at
    all) lets the plan run."""
    for schema in _reversed_schemas(plan or (), using):
        try:
            with connections[using].cursor() as cursor:
                cursor.execute(refuse_with_rows_sql(schema))
        except DatabaseError as exc:
            cause = exc.__cause__
            state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
            diag = getattr(cause, "diag", None)
            if state != _HOLDS_ROWS or diag is None:
                raise
            raise CommandError(
                f"{diag.message_primary} (database {using!r}); no migration was unapplied.\n"
                f"HINT: {diag.message_hint}"
            ) from exc
