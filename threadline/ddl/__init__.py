"""DDL: the audit schema and per-table capture triggers.

``install_sql()`` renders the schema without a database (pinned per schema version);
``install()``, ``track()``, ``untrack()`` and ``sync()`` apply changes through the audit schema's
SQL API; ``track_sql()``/``untrack_sql()`` give the SQL-API statements for a migration.
"""

from threadline.ddl.names import CONTEXT_SETTING, DEFAULT_SCHEMA
from threadline.ddl.registry import (
    CAPTURE_VERSION,
    MASK_PLACEHOLDER,
    STATUSES,
    SyncAction,
    TrackedTable,
    TrackResult,
    parse_table_name,
)
from threadline.ddl.schema import (
    PINNED_VERSIONS,
    SCHEMA_VERSION,
    InstallResult,
    install,
    install_sql,
    installed_version,
    require_installed,
    written_by_another_build,
)
from threadline.ddl.triggers import (
    kept_options,
    sync,
    track,
    track_sql,
    tracked_tables,
    untrack,
    untrack_sql,
)
from threadline.ddl.uninstall import uninstall_sql

__all__ = [
    "CAPTURE_VERSION",
    "CONTEXT_SETTING",
    "DEFAULT_SCHEMA",
    "MASK_PLACEHOLDER",
    "PINNED_VERSIONS",
    "SCHEMA_VERSION",
    "STATUSES",
    "InstallResult",
    "SyncAction",
    "TrackResult",
    "TrackedTable",
    "install",
    "install_sql",
    "installed_version",
    "kept_options",
    "parse_table_name",
    "require_installed",
    "sync",
    "track",
    "track_sql",
    "tracked_tables",
    "uninstall_sql",
    "untrack",
    "untrack_sql",
    "written_by_another_build",
]
