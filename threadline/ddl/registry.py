"""What the tracking registry reports (:class:`TrackedTable`, :class:`TrackResult`,
:class:`SyncAction`, the statuses) and table names as users write them (:func:`parse_table_name`).
The operations that change the registry are in :mod:`threadline.ddl.triggers`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from psycopg import sql

from threadline.core.errors import (
    UnknownTable,
)
from threadline.ddl.names import DEFAULT_SCHEMA, qualified_name

CAPTURE_VERSION = 7
"""Version of the generated capture code (the audit schema's ``render_capture()``)."""

MASK_PLACEHOLDER = "[masked]"
"""What a masked column's value is replaced with in every audit image."""

OPS = ("insert", "update", "delete", "truncate")

STATUSES = ("installed", "outdated", "disabled", "missing", "orphaned")
"""What :func:`tracked_tables` reports for a table (see :class:`TrackedTable`)."""


@dataclass(frozen=True)
class TrackedTable:
    """A tracked table (or a leftover of one) as the registry and the catalog describe it."""

    table_schema: str | None
    table_name: str | None
    status: str
    """``installed``; ``outdated`` (columns, name or release changed since the code was generated:
    ``threadline sync`` or ``threadline track`` regenerates it with the stored options);
    ``disabled`` (a capture trigger does not fire); ``missing`` (a trigger or the function is
    gone); ``orphaned`` (the table is gone, or capture code belongs to no registry row:
    ``threadline sync`` removes it)."""
    detail: str | None
    keys: tuple[str, ...]
    exclude: tuple[str, ...]
    mask: tuple[str, ...]
    mode: str | None
    """``typed`` (kept in step by DDL event triggers) or ``drift_safe`` (needs no event trigger;
    never fails a write after DDL)."""
    function_name: str | None = None
    audit_schema: str = DEFAULT_SCHEMA

    @property
    def trigger_names(self) -> tuple[str, ...]:
        """The four capture triggers of this audit schema on the table."""
        return tuple(f"{self.audit_schema}_capture_{op}" for op in OPS)

    @property
    def current(self) -> bool:
        """True when the capture code is installed and matches the table as it is now."""
        return self.status == "installed"

    @property
    def name(self) -> str:
        """``schema.table`` (or the capture function's name when its table is unknown)."""
        if self.table_name is None:
            return f"(function {self.function_name})"
        return qualified_name(self.table_schema, self.table_name)

    def restore_command(self) -> str | None:
        """The command that brings this table back to its stored configuration (None if installed)."""
        if self.status in ("outdated", "missing"):
            return f"threadline track {shlex.quote(qualified_name(self.table_schema, self.table_name))}"
        if self.status == "disabled":
            table = sql.Identifier(self.table_schema or "", self.table_name or "").as_string(None)
            return "; ".join(
                f"ALTER TABLE {table} ENABLE TRIGGER {sql.Identifier(trigger).as_string(None)}"
                for trigger in self.trigger_names
            )
        if self.status == "orphaned":
            return "threadline sync"
        return None


@dataclass(frozen=True)
class TrackResult:
    """What :func:`track` did and the options now in force (``previous_*`` is None for a new table)."""

    table_schema: str
    table_name: str
    action: str
    """``tracked`` (new), ``regenerated`` or ``unchanged``."""
    keys: tuple[str, ...]
    exclude: tuple[str, ...]
    mask: tuple[str, ...]
    previous_keys: tuple[str, ...] | None
    previous_exclude: tuple[str, ...] | None
    previous_mask: tuple[str, ...] | None
    unprotected: tuple[str, ...]
    """Columns whose name looks secret and that are neither masked nor excluded."""
    mode: str
    keys_unique: bool = True
    """False when no unique index (or primary key) covers the key columns: two rows may then
    share a key, and their histories mix (``revert`` refuses such rows)."""

    @property
    def options_changed(self) -> bool:
        """True when keys, exclude or mask differ from what was stored before."""
        return self.previous_keys is not None and (
            (self.previous_keys, self.previous_exclude, self.previous_mask)
            != (self.keys, self.exclude, self.mask)
        )


@dataclass(frozen=True)
class SyncAction:
    """One line of :func:`sync`: what was done to a table or a leftover capture function."""

    table_schema: str | None
    table_name: str | None
    action: str
    """``regenerated``, ``unchanged``, ``pruned``, ``orphaned (kept)`` or ``disabled (kept)``."""
    detail: str | None


# ---------------------------------------------------------------------------------------------
# Names


def parse_table_name(text: str) -> tuple[str | None, str]:
    """Split ``[schema.]table`` into ``(schema or None, table)``.

    A part may be double-quoted, with ``""`` for a quote inside (needed for names holding a dot).
    Unquoted parts are taken literally, with no case folding. A name without a schema is looked up
    on the search path.
    """
    if not isinstance(text, str) or not text:
        raise UnknownTable("table name is empty")
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            buf, j = [], i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise UnknownTable(f"unbalanced quotes in table name {text!r}")
                buf.append(text[j:k])
                if text[k + 1 : k + 2] != '"':
                    break
                buf.append('"')
                j = k + 2
            parts.append("".join(buf))
            i = k + 1
        else:
            k = text.find(".", i)
            k = n if k < 0 else k
            parts.append(text[i:k])
            i = k
        if i >= n:
            break
        if text[i] != ".":
            raise UnknownTable(f"unexpected text after a quoted name in {text!r}")
        i += 1
    if len(parts) > 2 or not all(parts):
        raise UnknownTable(f"{text!r} is not of the form [schema.]table (quote names that contain a dot)")
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
