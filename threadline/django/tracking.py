"""Declarative tracking: ``THREADLINE["TRACK"]`` names the models to capture, applied after every
``migrate`` (so the test database Django creates is captured exactly as production is)::

    THREADLINE = {
        "TRACK": {
            "shop.Order": {"mask": ["card_number"]},
            "shop.Customer": {"exclude": ["password_hash"]},
            "blog.Post": {},
        },
    }

Model and field names are resolved to ``db_table`` and ``db_column`` as the models are now
(a renamed model or field is followed); a name that is not a field is taken as a column name.
Applying it is ``track()`` for each model: idempotent, and options only ever add masks and
excludes. Removing a mask from the setting does not reveal the column: that takes
``manage.py threadline track <table> --unmask <column>``. ``"TRACK_ON_MIGRATE": False`` turns the
``post_migrate`` handler off (then use ``Track`` operations in migrations instead).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from threadline.core.errors import ConfigurationError

logger = logging.getLogger("threadline.django")

__all__ = ["apply_tracking", "column_names"]


def _quoted(table: str) -> str:
    return '"' + table.replace('"', '""') + '"'


def column_names(model: Any, names: Sequence[str]) -> tuple[str, ...]:
    """The columns of ``model``'s fields named ``names`` (``db_column`` followed); a name that is
    not a field is taken as a column name. Shared by ``THREADLINE["TRACK"]`` and the migration
    operations."""
    out = []
    for name in names:
        try:
            field = model._meta.get_field(name)
        except Exception:  # not a field name: taken as a column name
            out.append(name)
            continue
        column = getattr(field, "column", None)
        if not column:
            raise ConfigurationError(f"{model._meta.label}.{name} has no column (a relation without one)")
        out.append(column)
    return tuple(out)


def apply_tracking(
    using: str, track: Mapping[str, Mapping[str, tuple[str, ...]]], audit_schema: str
) -> list[str]:
    """Track every model of ``track`` that lives in database ``using``; the tables tracked."""
    from django.apps import apps
    from django.db import connections, router

    from threadline.core._connection import native
    from threadline.ddl.schema import installed_version
    from threadline.ddl.triggers import track as track_table

    wrapper = connections[using]
    if wrapper.vendor != "postgresql" or not track:
        return []
    raw, _ = native(wrapper)
    if installed_version(raw, audit_schema) is None:
        return []
    done = []
    for label, options in track.items():
        try:
            model = apps.get_model(label)
        except LookupError as exc:
            raise ConfigurationError(
                f"THREADLINE['TRACK'] names {label!r}, which is not an installed model"
            ) from exc
        if not router.allow_migrate_model(using, model):
            continue
        table = model._meta.db_table
        if raw.execute("SELECT to_regclass(%s) IS NULL", [_quoted(table)]).fetchone() == (True,):
            # migrated to a state without this model's table (migrate app 0002): nothing to track yet
            logger.warning("THREADLINE['TRACK']: %s has no table %s in database %r yet", label, table, using)
            continue
        track_table(
            raw,
            table,
            mask=column_names(model, options["mask"]) or None,
            exclude=column_names(model, options["exclude"]) or None,
            keys=column_names(model, options["keys"]) or None,
            audit_schema=audit_schema,
        )
        done.append(table)
    return done


def on_post_migrate(sender: Any = None, using: str = "default", **_: Any) -> None:
    """``post_migrate`` receiver (connected for threadline's app only, so once per ``migrate``)."""
    from threadline.propagation.django import load_settings

    conf = load_settings()
    apply_tracking(using, conf.track, conf.audit_schema)
