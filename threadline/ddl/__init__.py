"""DDL: the audit schema and per-table capture triggers.

``install_sql()`` renders the schema without a database; ``install()``, ``track()`` and
``untrack()`` apply changes; ``track_sql()``/``untrack_sql()`` show what they would run.
"""

from threadline.ddl.names import CONTEXT_SETTING, DEFAULT_SCHEMA
from threadline.ddl.schema import (
    SCHEMA_VERSION,
    InstallResult,
    install,
    install_sql,
    installed_version,
    require_installed,
)
from threadline.ddl.triggers import (
    MASK_PLACEHOLDER,
    CapturePlan,
    TrackedTable,
    parse_table_name,
    plan_capture,
    track,
    track_sql,
    tracked_tables,
    untrack,
    untrack_sql,
)

__all__ = [
    "CONTEXT_SETTING",
    "DEFAULT_SCHEMA",
    "MASK_PLACEHOLDER",
    "SCHEMA_VERSION",
    "CapturePlan",
    "InstallResult",
    "TrackedTable",
    "install",
    "install_sql",
    "installed_version",
    "parse_table_name",
    "plan_capture",
    "require_installed",
    "track",
    "track_sql",
    "tracked_tables",
    "untrack",
    "untrack_sql",
]
