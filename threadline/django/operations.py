"""Migration operations: install the audit schema and track models, reversibly.

Every operation renders its SQL from the pinned SQL API (the same statements as
``threadline install --print-sql`` and ``threadline track --print-sql``), so ``sqlmigrate`` shows
it and the migration file never changes when threadline is upgraded::

    from threadline.django.operations import Track

    class Migration(migrations.Migration):
        dependencies = [("shop", "0003_order"), ("threadline", "0001_install")]
        operations = [Track("shop.Order", mask=["card_number"])]

Model and field names are resolved against the migration state, so a ``Track`` follows
``db_table`` and ``db_column``; a name that is not a field is taken as a column name.

Database routers are followed as by Django's own operations: ``Track``, ``Untrack`` and
``TakeBaseline`` do nothing in a database the routers keep the model out of, and
``InstallAudit`` installs the audit schema in each database the routers let the migration's app
(``threadline`` for threadline's own migrations) migrate to, by default every one.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

from django.db import router
from django.db.migrations.operations.base import Operation

from threadline.core.errors import ConfigurationError
from threadline.ddl.names import check_schema_name, quote_ident
from threadline.ddl.schema import PINNED_VERSIONS, install_sql
from threadline.ddl.triggers import track_sql, untrack_sql
from threadline.ddl.uninstall import uninstall_sql
from threadline.django.tracking import column_names

__all__ = ["InstallAudit", "TakeBaseline", "Track", "Untrack"]


class _SchemaFromSettings:
    """``audit_schema``: the one given to the operation, else ``THREADLINE["AUDIT_SCHEMA"]`` when
    the migration runs (``threadline`` by default)."""

    given_schema: str | None = None

    def _given(self, audit_schema: str | None) -> None:
        if audit_schema is not None:
            check_schema_name(audit_schema)
        self.given_schema = audit_schema

    @property
    def audit_schema(self) -> str:
        """The audit schema the operation works in."""
        if self.given_schema is not None:
            return self.given_schema
        from threadline.propagation.django import load_settings

        return load_settings().audit_schema


class InstallAudit(_SchemaFromSettings, Operation):
    """Install (or upgrade in place to) the pinned audit schema ``version``.

    ``audit_schema`` names the schema; without it, the one ``THREADLINE["AUDIT_SCHEMA"]`` names
    when the migration runs (``threadline`` by default), so that threadline's own migrations
    install the schema the admin, the checks and ``TRACK`` use. Reversing it drops the audit
    schema and every capture trigger, and is refused while the schema holds audit records
    (changes, transactions, actions, task runs, baselines or seals: purge them, delete what a
    purge keeps, or drop the schema by hand).
    """

    reversible = True
    reduces_to_sql = True
    atomic = True

    def __init__(self, version: int, audit_schema: str | None = None, app_role: str | None = None) -> None:
        if version not in PINNED_VERSIONS:
            raise ConfigurationError(
                f"audit schema version {version!r} is not one this threadline knows ({', '.join(map(str, PINNED_VERSIONS))})"
            )
        self._given(audit_schema)
        self.version = version
        self.app_role = app_role

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        """The class name and arguments, as Django's migration writer expects them."""
        kwargs: dict[str, Any] = {"version": self.version}
        if self.given_schema is not None:
            kwargs["audit_schema"] = self.given_schema
        if self.app_role is not None:
            kwargs["app_role"] = self.app_role
        return (type(self).__name__, [], kwargs)

    def state_forwards(self, app_label: str, state: Any) -> None:
        """No model state changes."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Run the pinned install script (where the routers let ``app_label`` migrate)."""
        if not router.allow_migrate(schema_editor.connection.alias, app_label):
            return
        schema_editor.execute(
            install_sql(self.audit_schema, app_role=self.app_role, version=self.version), params=None
        )

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Drop the audit schema, unless it holds audit rows."""
        if not router.allow_migrate(schema_editor.connection.alias, app_label):
            return
        schema_editor.execute(uninstall_sql(self.audit_schema), params=None)

    def describe(self) -> str:
        """One line for ``migrate --plan``."""
        return f"Install the threadline audit schema {self.audit_schema!r} (version {self.version})"

    @property
    def migration_name_fragment(self) -> str:
        """Name part for auto-named migrations."""
        return f"threadline_v{self.version}"


def _names(values: Iterable[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    return tuple(values)


class _TableOperation(_SchemaFromSettings, Operation):
    """Shared by :class:`Track` and :class:`Untrack`: one model and its options."""

    reversible = True
    reduces_to_sql = True
    atomic = True

    def __init__(
        self,
        model: str,
        # not keyword-only: Django before 5.1 writes only positional-or-keyword arguments into a
        # migration it generates (squashmigrations), and would drop the options
        mask: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        keys: Iterable[str] | str | None = None,
        audit_schema: str | None = None,
    ) -> None:
        app_label, dot, model_name = model.partition(".")
        if not dot or not app_label or not model_name:
            raise ConfigurationError(f"name the model as 'app_label.ModelName', got {model!r}")
        self.model = model
        self.mask = _names(mask)
        self.exclude = _names(exclude)
        self.keys = _names(keys)
        self._given(audit_schema)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        """The class name and arguments, as Django's migration writer expects them."""
        kwargs: dict[str, Any] = {}
        for name in ("mask", "exclude", "keys"):
            if getattr(self, name):
                kwargs[name] = list(getattr(self, name))
        if self.given_schema is not None:
            kwargs["audit_schema"] = self.given_schema
        return (type(self).__name__, [self.model], kwargs)

    def state_forwards(self, app_label: str, state: Any) -> None:
        """No model state changes."""

    def _resolve(self, state: Any, alias: str) -> tuple[str, dict[str, tuple[str, ...]]] | None:
        """The model's table and its options as column names, in the migration ``state``; ``None``
        when the routers keep the model out of database ``alias``."""
        app_label, _, model_name = self.model.partition(".")
        model = state.apps.get_model(app_label, model_name)
        if not self.allow_migrate_model(alias, model):
            return None
        meta = model._meta
        columns = partial(column_names, model)
        return meta.db_table, {
            "mask": columns(self.mask),
            "exclude": columns(self.exclude),
            "keys": columns(self.keys),
        }

    def _track(self, schema_editor: Any, state: Any) -> None:
        resolved = self._resolve(state, schema_editor.connection.alias)
        if resolved is None:
            return
        table, options = resolved
        schema_editor.execute(
            track_sql(
                table,
                mask=options["mask"] or None,
                exclude=options["exclude"] or None,
                keys=options["keys"] or None,
                audit_schema=self.audit_schema,
            ),
            params=None,  # the SQL holds no placeholders: nothing to interpolate
        )

    def _untrack(self, schema_editor: Any, state: Any) -> None:
        resolved = self._resolve(state, schema_editor.connection.alias)
        if resolved is None:
            return
        table, _ = resolved
        schema_editor.execute(untrack_sql(table, audit_schema=self.audit_schema), params=None)


class Track(_TableOperation):
    """Capture every change of ``"app_label.Model"`` (``mask``/``exclude``/``keys`` name fields
    or columns). Reversing it removes the capture; the audit rows stay."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Track the model's table."""
        self._track(schema_editor, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Untrack the model's table."""
        self._untrack(schema_editor, from_state)

    def describe(self) -> str:
        """One line for ``migrate --plan``."""
        return f"Track changes of {self.model}" + (f" (mask {', '.join(self.mask)})" if self.mask else "")

    @property
    def migration_name_fragment(self) -> str:
        """Name part for auto-named migrations."""
        return f"track_{self.model.partition('.')[2].lower()}"


class Untrack(_TableOperation):
    """Stop capturing ``"app_label.Model"`` (its audit rows stay). Reversing it tracks the model
    again with the options given here: pass the ones it was tracked with."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Untrack the model's table."""
        self._untrack(schema_editor, from_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Track the model's table again."""
        self._track(schema_editor, to_state)

    def describe(self) -> str:
        """One line for ``migrate --plan``."""
        return f"Stop tracking changes of {self.model}"

    @property
    def migration_name_fragment(self) -> str:
        """Name part for auto-named migrations."""
        return f"untrack_{self.model.partition('.')[2].lower()}"


class TakeBaseline(_SchemaFromSettings, Operation):
    """Record every row ``"app_label.Model"``'s table holds as the start of its history (see
    :func:`threadline.take_baseline`), in batches of ``batch_size`` rows that each commit.

    Each batch commits, so the operation belongs in a migration with ``atomic = False`` (it is
    refused inside a transaction, where it would hold its locks to the end). Taking it again
    continues an interrupted baseline; reversing it leaves the recorded snapshots in place.
    """

    reversible = True
    reduces_to_sql = False
    atomic = False

    def __init__(self, model: str, batch_size: int = 10_000, audit_schema: str | None = None) -> None:
        app_label, dot, model_name = model.partition(".")
        if not dot or not app_label or not model_name:
            raise ConfigurationError(f"name the model as 'app_label.ModelName', got {model!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self._given(audit_schema)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        """The class name and arguments, as Django's migration writer expects them."""
        kwargs: dict[str, Any] = {}
        if self.batch_size != 10_000:
            kwargs["batch_size"] = self.batch_size
        if self.given_schema is not None:
            kwargs["audit_schema"] = self.given_schema
        return (type(self).__name__, [self.model], kwargs)

    def state_forwards(self, app_label: str, state: Any) -> None:
        """No model state changes."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Take the baseline, batch by batch (not where the routers keep the model out)."""
        connection = schema_editor.connection
        if connection.in_atomic_block:
            raise ConfigurationError(
                f"TakeBaseline({self.model!r}) commits after every batch: put it in a migration with "
                "atomic = False"
            )
        label, _, name = self.model.partition(".")
        model = to_state.apps.get_model(label, name)
        if not self.allow_migrate_model(connection.alias, model):
            return
        table = model._meta.db_table
        statement = f"SELECT finished FROM {quote_ident(self.audit_schema)}.baseline_batch(%s::regclass, %s)"
        target = quote_ident(table)
        while True:
            with connection.cursor() as cursor:
                cursor.execute(statement, [target, self.batch_size])
                (finished,) = cursor.fetchone()
            if finished:
                return

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """Nothing: the snapshots stay, as every audit row does."""

    def describe(self) -> str:
        """One line for ``migrate --plan``."""
        return f"Take the baseline of {self.model}"

    @property
    def migration_name_fragment(self) -> str:
        """Name part for auto-named migrations."""
        return f"baseline_{self.model.partition('.')[2].lower()}"
