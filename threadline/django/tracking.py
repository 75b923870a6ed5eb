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

A model whose table, or one of whose named columns, the migrated state does not have yet is
skipped with a warning (its tracking is left as it is: never applied with fewer masks). With
multi-table inheritance a child's entry cannot name its parent's fields (their columns are in the
parent's table): track the parent with them (system check ``threadline.E003``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from threadline.core.errors import ConfigurationError, ThreadlineError

logger = logging.getLogger("threadline.django")

__all__ = ["apply_tracking", "column_names", "inheritance_error", "inherited_fields"]


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


def inherited_fields(model: Any, names: Sequence[str]) -> dict[str, Any]:
    """The names among ``names`` that are fields of a parent model of ``model`` (multi-table
    inheritance), each with that parent: their columns are in the parent's table, not
    ``model``'s, so only tracking the parent (with those options) captures them."""
    found = {}
    own = model._meta.concrete_model
    for name in names:
        try:
            field = model._meta.get_field(name)
        except Exception:  # not a field name: taken as a column name
            continue
        owner = getattr(field, "model", None)
        if owner is not None and getattr(field, "column", None) and owner._meta.concrete_model is not own:
            found[name] = owner
    return found


def inheritance_error(label: str, option: str, inherited: Mapping[str, Any]) -> str:
    """Why naming a parent's fields in ``label``'s ``option`` cannot work, and what to do."""
    parents = sorted({parent._meta.label for parent in inherited.values()})
    names = sorted(inherited)
    tables = sorted({parent._meta.db_table for parent in inherited.values()})
    return (
        f"THREADLINE['TRACK'][{label!r}][{option!r}] names {', '.join(names)}, inherited from "
        f"{', '.join(parents)}: those columns are in the parent's table ({', '.join(tables)}), not "
        f"{label}'s; track {' and '.join(repr(p) for p in parents)} with {option} {names!r} instead"
    )


def _table_columns(raw: Any, table: str) -> set[str] | None:
    """The columns of ``table`` (``None`` when there is no such table)."""
    if raw.execute("SELECT to_regclass(%s) IS NULL", [_quoted(table)]).fetchone() == (True,):
        return None
    rows = raw.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        [_quoted(table)],
    ).fetchall()
    return {row[0] for row in rows}


def _apply_one(
    raw: Any, using: str, label: str, options: Mapping[str, tuple[str, ...]], audit_schema: str
) -> str | None:
    """Track one entry of ``THREADLINE["TRACK"]``; its table, or ``None`` when it is skipped."""
    from django.apps import apps
    from django.db import router

    from threadline.ddl.triggers import track as track_table

    try:
        model = apps.get_model(label)
    except LookupError as exc:
        raise ConfigurationError(
            f"THREADLINE['TRACK'] names {label!r}, which is not an installed model"
        ) from exc
    if not router.allow_migrate_model(using, model):
        return None
    for option in ("mask", "exclude", "keys"):
        inherited = inherited_fields(model, options[option])
        if inherited:
            raise ConfigurationError(inheritance_error(label, option, inherited))
    table = model._meta.db_table
    existing = _table_columns(raw, table)
    if existing is None:
        # migrated to a state without this model's table (migrate app 0002): nothing to track yet
        logger.warning("THREADLINE['TRACK']: %s has no table %s in database %r yet", label, table, using)
        return None
    resolved = {option: column_names(model, options[option]) for option in ("mask", "exclude", "keys")}
    missing = sorted({c for columns in resolved.values() for c in columns} - existing)
    if missing:
        # migrated to a state before (or after) these columns: tracking the table without them
        # would capture them unmasked once they exist, so its tracking is left as it is
        logger.warning(
            "THREADLINE['TRACK']: %s: table %s in database %r has no column %s (yet); its tracking "
            "is left as it is until a migrate reaches a state with every column the entry names",
            label,
            table,
            using,
            ", ".join(missing),
        )
        return None
    track_table(
        raw,
        table,
        mask=resolved["mask"] or None,
        exclude=resolved["exclude"] or None,
        keys=resolved["keys"] or None,
        audit_schema=audit_schema,
    )
    return str(table)


def apply_tracking(
    using: str, track: Mapping[str, Mapping[str, tuple[str, ...]]], audit_schema: str
) -> list[str]:
    """Track every model of ``track`` that lives in database ``using``; the tables tracked.

    An entry that cannot be applied does not stop the others: they are all tried, then the
    failures are raised together as one :class:`ConfigurationError`.
    """
    import psycopg
    from django.db import connections, router

    from threadline.core._connection import native
    from threadline.ddl.schema import installed_version

    wrapper = connections[using]
    if wrapper.vendor != "postgresql" or not track:
        return []
    raw, _ = native(wrapper)
    if installed_version(raw, audit_schema) is None:
        if router.allow_migrate(using, "threadline"):
            logger.warning(
                "THREADLINE['TRACK'] is not applied in database %r: its audit schema %r is not"
                " installed there (THREADLINE['AUDIT_SCHEMA']; run manage.py migrate threadline, or"
                " manage.py threadline install --database %s --audit-schema %s)",
                using,
                audit_schema,
                using,
                audit_schema,
            )
        return []
    done = []
    failed = []
    for label, options in track.items():
        try:
            table = _apply_one(raw, using, label, options, audit_schema)
        except (ThreadlineError, psycopg.Error) as exc:
            logger.error("THREADLINE['TRACK']: %s not applied in database %r: %s", label, using, exc)
            failed.append(f"{label}: {exc}")
            continue
        if table is not None:
            done.append(table)
    if failed:
        raise ConfigurationError(
            f"THREADLINE['TRACK'] could not be applied in database {using!r} (the other entries were): "
            + "; ".join(failed)
        )
    return done


def on_post_migrate(sender: Any = None, using: str = "default", **_: Any) -> None:
    """``post_migrate`` receiver (connected for threadline's app only, so once per ``migrate``)."""
    from threadline.propagation.django import load_settings

    conf = load_settings()
    apply_tracking(using, conf.track, conf.audit_schema)
