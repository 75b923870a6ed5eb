"""System checks (``manage.py check``): set-up mistakes that would otherwise fail silently.

=================  =====================================================================
``threadline.E001``  ``ThreadlineMiddleware`` runs before ``AuthenticationMiddleware``: no request has an actor
``threadline.E002``  a PostgreSQL database runs on psycopg2: its writes carry no context
``threadline.E003``  a ``THREADLINE["TRACK"]`` entry of a child model names its parent's fields
``threadline.E004``  (``--database``) ``THREADLINE["AUDIT_SCHEMA"]`` is not installed, another schema is
``threadline.W001``  ``ThreadlineMiddleware`` is not in ``MIDDLEWARE``: web requests carry no context
``threadline.W002``  no ``AuthenticationMiddleware``: the default actor resolver finds no user
``threadline.W003``  ``ORM_BRIDGE`` is off: Django's own writes carry no context
``threadline.W004``  a database that is not PostgreSQL: its writes are not audited
``threadline.W010``  (``--database``) a tracked table whose capture is not ``installed``
=================  =====================================================================

``ThreadlineMiddleware`` without ``"threadline"`` in ``INSTALLED_APPS`` cannot be caught here (the
checks are the app's); the middleware itself refuses to start then.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from threadline.ddl.names import DEFAULT_SCHEMA

__all__ = ["check_database", "check_setup"]

MIDDLEWARE_NAMES = (
    "threadline.django.ThreadlineMiddleware",
    "threadline.propagation.django.ThreadlineMiddleware",
)
AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"


def _names_a_subclass(path: str, names: tuple[str, ...], base: Any) -> bool:
    """Whether the ``MIDDLEWARE`` entry ``path`` is one of ``names`` or a subclass of ``base``."""
    if path in names:
        return True
    try:
        found = import_string(path)
        return isinstance(found, type) and issubclass(found, base)
    except Exception:  # a middleware that cannot be imported is Django's own check's business
        return False


def _is_auth_middleware(path: str) -> bool:
    from django.contrib.auth.middleware import AuthenticationMiddleware

    return _names_a_subclass(path, (AUTH_MIDDLEWARE,), AuthenticationMiddleware)


def _is_our_middleware(path: str) -> bool:
    from threadline.propagation.django import ThreadlineMiddleware

    return _names_a_subclass(path, MIDDLEWARE_NAMES, ThreadlineMiddleware)


def check_setup(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Middleware order, database drivers and the ORM bridge."""
    from threadline.propagation.django import default_actor_resolver, load_settings

    found: list[checks.CheckMessage] = []
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    ours = next((i for i, m in enumerate(middleware) if _is_our_middleware(m)), None)
    auth = next((i for i, m in enumerate(middleware) if _is_auth_middleware(m)), None)
    conf = load_settings()
    if ours is None:
        found.append(
            checks.Warning(
                "ThreadlineMiddleware is not in MIDDLEWARE: web requests carry no audit context "
                "(no actor, no correlation id)",
                hint="add 'threadline.django.ThreadlineMiddleware' after "
                "'django.contrib.auth.middleware.AuthenticationMiddleware'",
                id="threadline.W001",
            )
        )
    elif auth is not None and ours < auth:
        found.append(
            checks.Error(
                "ThreadlineMiddleware runs before AuthenticationMiddleware: request.user is not set "
                "yet, so no request has an actor",
                hint="move 'threadline.django.ThreadlineMiddleware' after "
                "'django.contrib.auth.middleware.AuthenticationMiddleware'",
                id="threadline.E001",
            )
        )
    elif auth is None and conf.actor_resolver is default_actor_resolver:
        found.append(
            checks.Warning(
                "no AuthenticationMiddleware in MIDDLEWARE: the default actor resolver finds no "
                "request.user, so requests have no actor",
                hint="add Django's AuthenticationMiddleware before ThreadlineMiddleware, or set "
                "THREADLINE['ACTOR_RESOLVER']",
                id="threadline.W002",
            )
        )
    if not conf.orm_bridge:
        found.append(
            checks.Warning(
                "THREADLINE['ORM_BRIDGE'] is off: Django's own database writes carry no audit context",
                hint="remove the setting, unless every write goes through another bridge",
                id="threadline.W003",
            )
        )
    found.extend(_database_drivers())
    found.extend(_inherited_track_options(conf.track))
    return found


def _inherited_track_options(track: Any) -> list[checks.CheckMessage]:
    """A ``TRACK`` entry of a model with multi-table inheritance that names its parent's fields:
    their columns are in the parent's table, so the entry cannot mask or exclude them."""
    from django.apps import apps

    from threadline.django.tracking import inheritance_error, inherited_fields

    found: list[checks.CheckMessage] = []
    for label, options in track.items():
        try:
            model = apps.get_model(label)
        except LookupError:  # applying the setting names it, after migrate
            continue
        for option in ("mask", "exclude", "keys"):
            inherited = inherited_fields(model, options[option])
            if inherited:
                found.append(
                    checks.Error(
                        inheritance_error(label, option, inherited),
                        hint="each table of a multi-table inheritance is tracked on its own: "
                        "name a field in the entry of the model whose table holds it",
                        obj=model,
                        id="threadline.E003",
                    )
                )
    return found


def _database_drivers() -> list[checks.CheckMessage]:
    from django.db import connections

    found: list[checks.CheckMessage] = []
    for alias in connections:
        wrapper = connections[alias]
        if wrapper.vendor != "postgresql":
            found.append(
                checks.Warning(
                    f"database {alias!r} is {wrapper.vendor}: its writes are not audited by threadline",
                    id="threadline.W004",
                )
            )
            continue
        from django.db.backends.postgresql.psycopg_any import is_psycopg3

        if not is_psycopg3:
            found.append(
                checks.Error(
                    f"database {alias!r} runs on psycopg2: threadline carries the audit context on "
                    "psycopg 3 connections only, so its writes have no actor",
                    hint="pip uninstall psycopg2 psycopg2-binary (Django then uses psycopg 3, "
                    "which threadline installs)",
                    id="threadline.E002",
                )
            )
    return found


def check_database(
    app_configs: Iterable[Any] | None = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """With ``manage.py check --database ALIAS``: every tracked table's capture is installed, and
    the audit schema is this build's."""
    from django.db import connections

    from threadline.core._connection import native
    from threadline.ddl.schema import installed_version, written_by_another_build
    from threadline.ddl.triggers import tracked_tables
    from threadline.propagation.django import load_settings

    schema = load_settings().audit_schema
    found: list[checks.CheckMessage] = []
    for alias in databases or ():
        wrapper = connections[alias]
        if wrapper.vendor != "postgresql":
            continue
        raw, _ = native(wrapper)
        if installed_version(raw, schema) is None:
            if installed_version(raw) is not None and schema != DEFAULT_SCHEMA:
                found.append(
                    checks.Error(
                        f"database {alias!r}: THREADLINE['AUDIT_SCHEMA'] is {schema!r}, which is not"
                        f" installed there, but the audit schema {DEFAULT_SCHEMA!r} is: the admin and"
                        " TRACK use the one the setting names",
                        hint=f"set AUDIT_SCHEMA to {DEFAULT_SCHEMA!r}, or run: manage.py threadline install"
                        f" --database {alias} --audit-schema {schema}",
                        id="threadline.E004",
                    )
                )
            continue
        if written_by_another_build(raw, schema):
            found.append(
                checks.Warning(
                    f"database {alias!r}: the audit schema was installed by another build of this "
                    "release's schema version (its functions and capture code may differ)",
                    hint=f"run: manage.py threadline install --database {alias}",
                    id="threadline.W011",
                )
            )
        for table in tracked_tables(raw, schema):
            if table.status != "installed":
                command = table.restore_command()
                if command is not None and command.startswith("threadline "):
                    command = f"manage.py {command} --database {alias}"
                found.append(
                    checks.Warning(
                        f"database {alias!r}: capture of {table.name} is {table.status}",
                        hint=None if command is None else f"run: {command}",
                        id="threadline.W010",
                    )
                )
    return found
