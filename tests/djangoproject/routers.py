"""The auth, token and shop apps live in the ``migrations`` database (created by the tests)."""

from __future__ import annotations

from typing import Any

APPS = {"auth", "contenttypes", "authtoken", "shop"}


class MigrationsRouter:
    """Route the models of :data:`APPS` to the ``migrations`` alias, and only migrate them there."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "migrations" if model._meta.app_label in APPS else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "migrations" if model._meta.app_label in APPS else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if app_label in APPS:
            return db == "migrations"
        return None
