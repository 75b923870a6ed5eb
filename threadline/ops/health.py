"""Health of the audit trail: trigger coverage and context coverage.

*Trigger coverage* (:func:`trigger_coverage`): for every table, is capture installed (all four
triggers of this audit schema), enabled (``pg_trigger.tgenabled``: ``O`` or ``A`` fire in
normal sessions, ``D`` and ``R`` do not) and current (the generated code's fingerprint matches
what this release would generate for the table's columns today)? :func:`check_expected` turns a
list of tables that must be covered into problems: the CI gate of ``threadline coverage --expect``.

*Context coverage* (:func:`context_coverage`): of the transactions recorded recently, the share
per origin and Celery task name with no actor, no correlation id or a refused context — so code
paths that write without context are found.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import CoverageError, TrackingError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name, qualified_name, trigger_name
from threadline.ddl.registry import OPS, TrackedTable, parse_table_name
from threadline.ddl.schema import require_installed
from threadline.ddl.triggers import tracked_tables
from threadline.ops.observability import emit

logger = logging.getLogger("threadline.health")

__all__ = [
    "ContextCoverage",
    "CoverageReport",
    "TableCoverage",
    "check_expected",
    "context_coverage",
    "coverage",
    "tracking_problems",
    "trigger_coverage",
]

_FIRING = ("O", "A")
_TGENABLED = {"O": "origin", "A": "always", "R": "replica", "D": "disabled"}


@dataclass(frozen=True)
class TableCoverage:
    """Capture status of one table (or of capture code left behind by a table that is gone)."""

    table_schema: str | None
    table_name: str | None
    installed: bool
    """All four capture triggers (insert, update, delete, truncate) exist."""
    enabled: bool
    """Every capture trigger that exists fires in normal sessions (``tgenabled`` O or A)."""
    current: bool
    """The generated code matches the table as it is now and this release's capture version."""
    triggers: dict[str, str] = field(default_factory=dict)
    """Operation → ``tgenabled`` spelled out (origin, always, replica, disabled)."""
    tracked_status: str | None = None
    """The registry's status (:data:`threadline.ddl.STATUSES`); None for an untracked table."""
    detail: str | None = None
    """Why the status is not ``installed``."""
    restore: str | None = None
    """The command that restores the table with its stored options."""
    baseline: str | None = None
    """For a tracked table: ``complete``, ``in progress`` (taken again, it continues) or ``none``
    (see :func:`threadline.take_baseline`)."""

    @property
    def name(self) -> str:
        """``schema.table``, each part quoted when it needs to be (a capture function whose table
        is unknown is named as such)."""
        if self.table_schema is None:
            return f"(capture function {self.table_name})"
        return qualified_name(self.table_schema, self.table_name)

    @property
    def status(self) -> str:
        """``installed``, ``outdated``, ``disabled``, ``missing``, ``orphaned``, ``replaced`` (an
        untracked table named like a tracked table that was dropped) or ``untracked``."""
        if self.tracked_status is not None:
            return self.tracked_status
        return "orphaned" if self.triggers else "untracked"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (with ``status``)."""
        return {**asdict(self), "table": self.name, "status": self.status}


@dataclass(frozen=True)
class ContextCoverage:
    """Recent transactions of one origin and Celery task name, and how many lack context."""

    origin: str | None
    task: str | None
    transactions: int
    no_actor: int
    no_correlation_id: int
    invalid: int
    """Transactions whose context was refused (``context_error`` set)."""

    @property
    def no_actor_share(self) -> float:
        """Share of transactions with no actor (0..1)."""
        return self.no_actor / self.transactions if self.transactions else 0.0

    @property
    def no_correlation_share(self) -> float:
        """Share of transactions with no correlation id (0..1)."""
        return self.no_correlation_id / self.transactions if self.transactions else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (with the shares)."""
        return {
            **asdict(self),
            "no_actor_share": round(self.no_actor_share, 4),
            "no_correlation_share": round(self.no_correlation_share, 4),
        }


def _baselines(conn: psycopg.Connection[Any], audit_schema: str) -> dict[tuple[str | None, str | None], str]:
    """The current baseline of each tracked table, under the table's name now."""
    rows = conn.execute(
        sql.SQL(
            "SELECT n.nspname, c.relname, b.finished_at IS NOT NULL"
            "  FROM {audit}.baselines b JOIN {audit}.tracked_tables t ON t.id = b.tracked_id"
            "  JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE b.ended_at IS NULL"
        ).format(audit=sql.Identifier(audit_schema))
    ).fetchall()
    return {(nsp, rel): "complete" if done else "in progress" for nsp, rel, done in rows}


def _dropped(conn: psycopg.Connection[Any], audit_schema: str) -> dict[tuple[str | None, str | None], Any]:
    """When each dropped tracked table of a name was dropped (tables that were untracked, not
    dropped, are left out: they keep their options for themselves)."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.dropped_tables', %s::text))", [audit_schema]
    ).fetchone()
    if not row or row[0] is None:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT d.table_schema, d.table_name, d.dropped_at FROM {}.dropped_tables d"
            " WHERE NOT (d.untracked AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = d.relid))"
        ).format(sql.Identifier(audit_schema))
    ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def trigger_coverage(
    conn: psycopg.Connection[Any],
    *,
    schemas: list[str] | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[TableCoverage]:
    """Capture status of every plain and partitioned table and every partition, optionally only
    in ``schemas``. System schemas and the audit schema are left out.

    A partition is listed too: statements that name it directly are not captured by its parent's
    statement-level triggers, so it counts as covered only when it is tracked itself.
    """
    check_schema_name(audit_schema)
    names = {trigger_name(audit_schema, op): op for op in OPS}
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, tg.tgname, tg.tgenabled
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_trigger tg ON tg.tgrelid = c.oid AND tg.tgname = ANY (%(triggers)s)
          LEFT JOIN pg_proc p ON p.oid = tg.tgfoid
          LEFT JOIN pg_namespace pn ON pn.oid = p.pronamespace
         WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
           AND n.nspname <> ALL (ARRAY['pg_catalog', 'information_schema', %(audit)s])
           AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
           AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY (%(schemas)s::text[]))
           AND (tg.oid IS NULL OR pn.nspname = %(audit)s)
         ORDER BY n.nspname, c.relname
        """,
        {"triggers": list(names), "audit": audit_schema, "schemas": schemas},
    ).fetchall()
    found: dict[tuple[str | None, str | None], dict[str, str]] = {}
    for nsp, rel, tgname, enabled in rows:
        ops = found.setdefault((nsp, rel), {})
        if tgname is not None:
            ops[names[tgname]] = _TGENABLED.get(enabled, enabled)
    registry: dict[tuple[str | None, str | None], TrackedTable] = {}
    for entry in tracked_tables(conn, audit_schema):
        key = (entry.table_schema, entry.table_name)
        if entry.table_name is None:
            key = (None, entry.function_name)
        registry[key] = entry
        if key not in found and (schemas is None or entry.table_schema in schemas):
            found[key] = {}  # gone from the catalog: orphaned capture code
    baselines = _baselines(conn, audit_schema)
    replaced = _dropped(conn, audit_schema)
    out: list[TableCoverage] = []
    for (nsp, rel), ops in found.items():
        entry_or_none = registry.get((nsp, rel))
        if entry_or_none is None and not ops and (nsp, rel) in replaced:
            # a tracked table of this name was dropped (a migration rebuilt it): this one is not
            out.append(
                TableCoverage(
                    table_schema=nsp,
                    table_name=rel,
                    installed=False,
                    enabled=False,
                    current=False,
                    tracked_status="replaced",
                    detail=(
                        f"the tracked table of this name was dropped at {replaced[(nsp, rel)]:%Y-%m-%d %H:%M:%S%z};"
                        " this one is not tracked (tracking it takes on the dropped table's masks)"
                    ),
                    restore=f"threadline track {qualified_name(nsp or '', rel or '')}",
                )
            )
            continue
        out.append(
            TableCoverage(
                table_schema=nsp,
                table_name=rel,
                installed=len(ops) == len(OPS),
                enabled=all(v in ("origin", "always") for v in ops.values()) and bool(ops),
                current=entry_or_none is not None and entry_or_none.current,
                triggers={op: ops[op] for op in OPS if op in ops},
                tracked_status=None if entry_or_none is None else entry_or_none.status,
                detail=(
                    entry_or_none.detail
                    if entry_or_none is not None
                    else ("capture triggers without a registry row" if ops else None)
                ),
                restore=(
                    entry_or_none.restore_command()
                    if entry_or_none is not None
                    else ("threadline track (keeps them) or threadline sync (removes them)" if ops else None)
                ),
                baseline=None if entry_or_none is None else baselines.get((nsp, rel), "none"),
            )
        )
    return out


def tracking_problems(tables: list[TableCoverage]) -> list[str]:
    """One line per tracked table (or leftover capture code) that is not ``installed``, with the
    command that restores it."""
    return [
        f"{t.name}: {t.status}"
        + (f" ({t.detail})" if t.detail else "")
        + (f"; run: {t.restore}" if t.restore else "")
        for t in tables
        if t.status not in ("installed", "untracked")
    ]


def check_expected(
    conn: psycopg.Connection[Any], tables: list[TableCoverage], expect: list[str]
) -> list[str]:
    """One line per expected table that is missing, untracked, disabled or outdated.

    Names are ``[schema.]table``; an unqualified name is looked up on the search path.
    """
    by_name = {(t.table_schema, t.table_name): t for t in tables}
    path = [r[0] for r in conn.execute("SELECT unnest(current_schemas(false))").fetchall()]
    problems: list[str] = []
    for text in expect:
        try:
            table_schema, name = parse_table_name(text)
        except TrackingError as exc:
            raise CoverageError(str(exc)) from exc
        candidates = [table_schema] if table_schema is not None else path
        entry = next((by_name[(s, name)] for s in candidates if (s, name) in by_name), None)
        if entry is None:
            where = f"schema {table_schema!r}" if table_schema else "the search path"
            problems.append(f"{text}: no such table in {where}")
        elif entry.status != "installed":
            detail = entry.detail or "capture is not installed"
            restore = entry.restore or f"threadline track {entry.name}"
            problems.append(f"{entry.name}: {entry.status}: {detail} (run: {restore})")
    for line in problems:
        logger.info("coverage: %s", line)
    return problems


def context_coverage(
    conn: psycopg.Connection[Any],
    *,
    since: timedelta = timedelta(days=1),
    audit_schema: str = DEFAULT_SCHEMA,
) -> list[ContextCoverage]:
    """Per origin and Celery task name, transactions of the last ``since`` lacking context.

    Sorted with the groups missing the most context first.
    """
    check_schema_name(audit_schema)
    if not isinstance(since, timedelta) or since <= timedelta(0):
        raise CoverageError("since must be a positive timedelta")
    rows = conn.execute(
        sql.SQL(
            """
            SELECT origin, job ->> 'name', count(*),
                   count(*) FILTER (WHERE actor IS NULL),
                   count(*) FILTER (WHERE correlation_id IS NULL),
                   count(*) FILTER (WHERE context_error IS NOT NULL)
              FROM {}.transactions
             WHERE occurred_at >= now() - %s::interval
             GROUP BY 1, 2
            """
        ).format(sql.Identifier(audit_schema)),
        [since],
    ).fetchall()
    out = [ContextCoverage(*r) for r in rows]
    out.sort(
        key=lambda c: (
            -(c.no_actor + c.no_correlation_id + c.invalid),
            -c.transactions,
            str(c.origin),
            str(c.task),
        )
    )
    return out


@dataclass(frozen=True)
class CoverageReport:
    """Everything ``threadline coverage`` reports."""

    tables: list[TableCoverage]
    contexts: list[ContextCoverage]
    problems: list[str]
    """Expected tables that are not fully covered, and tracked tables (or leftover capture code)
    that are not ``installed``; empty when the gate passes."""

    @property
    def ok(self) -> bool:
        """True when every expected table is covered and every tracked table is installed."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "ok": self.ok,
            "problems": self.problems,
            "tables": [t.to_dict() for t in self.tables],
            "contexts": [c.to_dict() for c in self.contexts],
        }


def coverage(
    conn: psycopg.Connection[Any],
    *,
    expect: list[str] | None = None,
    schemas: list[str] | None = None,
    since: timedelta = timedelta(days=1),
    audit_schema: str = DEFAULT_SCHEMA,
) -> CoverageReport:
    """Trigger coverage of every table (or of ``schemas``), the ``expect`` gate and context coverage."""
    require_installed(conn, audit_schema)
    every = trigger_coverage(conn, audit_schema=audit_schema)
    tables = [t for t in every if schemas is None or t.table_schema in schemas]
    problems = check_expected(conn, every, expect or [])
    named = {p.split(": ", 1)[0] for p in problems}
    problems += [p for p in tracking_problems(tables) if p.split(": ", 1)[0] not in named]
    contexts = context_coverage(conn, since=since, audit_schema=audit_schema)
    emit(
        "coverage.checked",
        tables=len(tables),
        tracked=sum(1 for t in tables if t.triggers),
        problems=len(problems),
        audit_schema=audit_schema,
    )
    return CoverageReport(tables, contexts, problems)
