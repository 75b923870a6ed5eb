"""The audit schema: tables, indexes, the context decoder and the per-transaction functions.

:func:`install_sql` renders the whole, idempotent script (for migrations and ``--print-sql``);
:func:`install` applies it to a database under an advisory lock and records the version.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from threadline.core.busy import TABLES_BUSY
from threadline.core.errors import ConfigurationError, PrivilegeError, SchemaError
from threadline.ddl.names import (
    DEFAULT_SCHEMA,
    check_schema_name,
    with_pinned_search_path,
)
from threadline.ddl.uninstall import uninstall_sql as uninstall_sql  # its home before ddl.uninstall

SCHEMA_VERSION = 7
"""Version of the audit schema this release installs."""

_SQL_DIR = Path(__file__).with_name("sql")

PARTITION_PERIODS = ("day", "week", "month", "quarter", "year")
"""The periods a partitioned audit store can be partitioned by."""

DEFAULT_PARTITION_BY = "month"
"""A new install's audit tables are partitioned by month unless told otherwise."""

PINNED_VERSIONS = (7,)
"""Schema versions whose install script is frozen: ``install_sql(version=N)`` gives the same text
in every later release, so a migration that embeds it never changes."""


def _script(version: int) -> str:
    if version not in PINNED_VERSIONS:
        raise SchemaError(
            f"schema version {version!r} has no pinned install script (pinned: "
            f"{', '.join(map(str, PINNED_VERSIONS))}); versions before 7 are upgraded by installing 7"
        )
    text = (_SQL_DIR / f"schema_v{version}.sql").read_text(encoding="utf-8")
    fragment = _SQL_DIR / f"schema_v{version}_usual_context.sql"
    if fragment.exists():
        # the usual context's path, written once: in insert_transaction_row(bigint), returning the
        # row's id, and in the capture code that render_capture() generates, returning NULL. Each
        # holds it twice: for a short context, then for a longer one of the same shape (a Celery
        # task's, with its job), whose ids are measured as well
        body = "".join(
            line
            for line in fragment.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith("-- ")
        )
        for returned in ("tx", "NULL"):
            path = body.replace("@returned@", returned)
            text = text.replace(
                f"@usual_context({returned})@",
                path.replace("@size@", f"octet_length(raw) <= {_SHORT_CONTEXT}").replace("@lengths@", ""),
            )
            text = text.replace(
                f"@long_context({returned})@",
                path.replace(
                    "@size@", f"octet_length(raw) BETWEEN {_SHORT_CONTEXT + 1} AND {_LARGEST_CONTEXT}"
                ).replace("@lengths@", _LENGTH_CHECK),
            )
    return text


# A context of at most this many bytes holds no string longer than 256 characters, so the usual
# path need not measure its strings. A longer one is measured without its job and meta: printed by
# jsonb in at most 278 bytes, the rest leaves no more than 256 to any id (the shortest frame around
# one, {"v": 1, "origin": ""}, takes 22), and its strings hold no escape (no backslash got this far).
_SHORT_CONTEXT = 275
# the complete checks refuse a larger one (insert_transaction_row(), decode_context())
_LARGEST_CONTEXT = 16384
_LENGTH_CHECK = """
           AND octet_length((j - '{job,meta}'::text[])::text) <= 278"""


def _script_comment(version: int) -> str:
    """The comment a version's script leaves on ``schema_version``: it names the script's text, so
    a store installed by an earlier build of the same version is recognised."""
    digest = hashlib.sha256(_script(version).encode()).hexdigest()[:16]
    return f"threadline audit schema {version}, script {digest}"


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did."""

    audit_schema: str
    previous_version: int | None
    version: int
    follows_ddl: bool = False
    """The schema's DDL event triggers are installed (only a superuser can create them): capture
    code follows every ALTER TABLE by itself. Otherwise it is drift-safe and ``threadline sync``
    brings it up to date after schema changes."""
    refreshed: bool = False
    """The schema was at this version, written by another build of it: its script ran again
    (functions, capture code and indexes replaced; no audit row is touched)."""

    @property
    def changed(self) -> bool:
        """True when the database was changed (a fresh install, an upgrade, or a refresh)."""
        return self.previous_version != self.version or self.refreshed


_PRIVILEGES = """\
-- least privilege for the application role {role}: read the audit tables, record actions,
-- never change or remove an audit row (capture runs as the owner: SECURITY DEFINER functions)
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role};
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
-- the columns a recorded action or task run gives: the ids and actions.inserted_at stay the
-- database's (an id chosen ahead would make later inserts fail, a time chosen would backdate)
GRANT INSERT (name, actor, status, verb, category, reason, comment, correlation_id, request_id, job_id,
              meta) ON {schema}.actions TO {role};
GRANT INSERT (task_id, name, attempt, outcome, error, correlation_id, causation_id, parent_id, root_id,
              actor, worker, started_at, ended_at) ON {schema}.task_runs TO {role};
GRANT EXECUTE ON FUNCTION {schema}.link_action(bigint) TO {role};
-- the seals' salts stay the owner's; verify salts digests through salted_digests()
REVOKE ALL ON {schema}.seal_salts FROM {role};
GRANT EXECUTE ON FUNCTION {schema}.salted_digests(bigint[], bytea[]) TO {role};
"""


def privileges_sql(app_role: str, audit_schema: str = DEFAULT_SCHEMA) -> str:
    """The grants that let ``app_role`` read the audit tables (and insert actions) but never
    insert, update, delete or truncate ``transactions`` and ``changes`` (idempotent)."""
    check_schema_name(audit_schema)
    if not isinstance(app_role, str) or not app_role or len(app_role) > 63:
        raise PrivilegeError(f"app role name {app_role!r} is not a role name")
    return (
        sql.SQL(_PRIVILEGES)
        .format(schema=sql.Identifier(audit_schema), role=sql.Identifier(app_role))
        .as_string(None)
    )


def grant_app_role(conn: psycopg.Connection, app_role: str, audit_schema: str = DEFAULT_SCHEMA) -> None:
    """Apply :func:`privileges_sql` for an existing role (not a superuser, not the schema's owner)."""
    text = privileges_sql(app_role, audit_schema)
    row = conn.execute(
        "SELECT r.rolsuper, pg_has_role(r.oid, n.nspowner, 'USAGE')"
        "  FROM pg_roles r LEFT JOIN pg_namespace n ON n.nspname = %s WHERE r.rolname = %s",
        [audit_schema, app_role],
    ).fetchone()
    if row is None:
        raise PrivilegeError(f"role {app_role!r} does not exist: create it first (CREATE ROLE ... LOGIN)")
    if row[0]:
        raise PrivilegeError(f"role {app_role!r} is a superuser: privileges cannot restrict it")
    if row[1]:
        raise PrivilegeError(
            f"role {app_role!r} owns (or is a member of the owner of) audit schema {audit_schema!r}: an owner can "
            "always change its tables; install as another role"
        )
    conn.execute(text.encode())


def check_partition_by(partition_by: str | None) -> str | None:
    """``partition_by`` if it is one of :data:`PARTITION_PERIODS` or ``None`` (plain tables)."""
    if partition_by is not None and partition_by not in PARTITION_PERIODS:
        raise SchemaError(
            f"partition_by must be one of {', '.join(PARTITION_PERIODS)} (or None for plain tables), "
            f"not {partition_by!r}"
        )
    return partition_by


def install_sql(
    audit_schema: str = DEFAULT_SCHEMA,
    *,
    app_role: str | None = None,
    version: int = SCHEMA_VERSION,
    partition_by: str | None = DEFAULT_PARTITION_BY,
) -> str:
    """The complete, idempotent DDL of the audit schema named ``schema``, at ``version``, as text.

    Needs no database: paste it into an Alembic or Django migration, or pipe it to ``psql
    --single-transaction``: it resolves every name in ``pg_catalog`` for as long as it runs
    (:func:`~threadline.ddl.names.with_pinned_search_path`), a setting local to its transaction. The
    script of a pinned version (:data:`PINNED_VERSIONS`) never changes in later releases, so a
    migration written with ``version=7`` keeps producing the same SQL; upgrading is a new
    migration with the newer version. It upgrades any earlier version in place. With
    ``app_role``, the grants of :func:`privileges_sql` follow.

    ``partition_by`` (a period of :data:`PARTITION_PERIODS`, or ``None``) applies when the script
    creates the audit tables: a new install is range-partitioned by that period, with the current
    period's partitions, ``ahead`` more (3 by default) and a DEFAULT partition. An existing
    install keeps its layout (:mod:`threadline.ops.partitions` migrates a plain one).
    """
    check_schema_name(audit_schema)
    check_partition_by(partition_by)
    text = _script(version).replace("@script_comment@", _script_comment(version))
    grants = "" if app_role is None else privileges_sql(app_role, audit_schema)
    # the name is a validated lowercase identifier: quoting it is all an identifier needs
    period = "NULL" if partition_by is None else f"'{partition_by}'"
    return with_pinned_search_path(
        text.replace("@audit@", f'"{audit_schema}"')
        .replace("@audit_name@", audit_schema)
        .replace("@partition_by@", period)
        + grants
    )


def layout_sql(audit_schema: str = DEFAULT_SCHEMA) -> str:
    """The part of the install script that depends on the audit tables' layout (plain or
    partitioned): what a store that moved to partitions runs again. It takes no lock on any
    application table."""
    text = install_sql(audit_schema)
    start = text.index("-- @layout:")
    return with_pinned_search_path(text[start : text.index("-- @layout end", start)])


def installed_version(conn: psycopg.Connection, audit_schema: str = DEFAULT_SCHEMA) -> int | None:
    """The audit schema version recorded in the database, or ``None`` if it is not installed."""
    check_schema_name(audit_schema)
    row = conn.execute(
        "SELECT to_regclass(format('%%I.schema_version', %s::text)) IS NOT NULL", [audit_schema]
    ).fetchone()
    if not row or not row[0]:
        return None
    found = conn.execute(
        sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(audit_schema))
    ).fetchone()
    return None if found is None else found[0]


def install(
    conn: psycopg.Connection,
    audit_schema: str = DEFAULT_SCHEMA,
    *,
    app_role: str | None = None,
    partition_by: str | None = DEFAULT_PARTITION_BY,
    lock_timeout: float = 2.0,
    attempts: int = 5,
) -> InstallResult:
    """Create or upgrade the audit schema in one transaction; a no-op when it is current (except
    that a superuser adds the DDL event triggers a non-superuser install could not create, and
    every tracked table then gets typed capture code).

    With ``app_role``, that role may then read the audit tables and record actions but never
    write, change or remove an audit row (:func:`grant_app_role`; applied even when the schema
    was already current).

    A new install is partitioned by ``partition_by`` (``None``: plain tables); see
    :func:`install_sql`.

    An upgrade or refresh alters the audit tables, so it waits for the transactions writing them,
    and the application's next writes wait behind it: each attempt waits at most
    ``lock_timeout`` seconds for a lock, and a busy table (a lock not granted in time, or a
    deadlock with a writer) is retried up to ``attempts`` times with a growing pause before
    :class:`SchemaError` says so (nothing changed).
    """
    check_schema_name(audit_schema)
    check_partition_by(partition_by)
    if app_role is not None:
        privileges_sql(app_role, audit_schema)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or lock_timeout <= 0:
        raise ConfigurationError(f"lock_timeout must be a positive number of seconds, not {lock_timeout!r}")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(f"attempts must be an integer of at least 1, not {attempts!r}")
    for attempt in range(1, attempts + 1):
        try:
            return _install_once(conn, audit_schema, app_role, partition_by, lock_timeout)
        except TABLES_BUSY as exc:
            if attempt == attempts:
                raise SchemaError(
                    f"the audit tables of {audit_schema!r} stayed busy: {attempts} attempt(s) could not "
                    f"take their locks within {lock_timeout:g} s ({exc.sqlstate}); nothing was changed. "
                    "Run install again when the long transactions writing tracked tables are over, "
                    "or give it a longer lock timeout"
                ) from exc
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def _install_once(
    conn: psycopg.Connection,
    audit_schema: str,
    app_role: str | None,
    partition_by: str | None,
    lock_timeout: float,
) -> InstallResult:
    """One attempt of :func:`install`, in one transaction (a savepoint inside the caller's)."""
    with conn.transaction():
        # names resolve in pg_catalog until the end (see with_pinned_search_path)
        path = conn.execute(
            "SELECT pg_catalog.current_setting('search_path'),"
            " pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)"
        ).fetchone()
        # another install of this schema runs to its end first (it holds no lock of the tables
        # the application writes while it waits here)
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('threadline install ' || %s))", [audit_schema])
        # a lock the script needs (an upgrade or refresh alters the audit tables) is waited for
        # at most this long: the application's writes queue behind a waiting lock
        row = conn.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)",
            [f"{max(1, round(lock_timeout * 1000))}ms"],
        ).fetchone()
        caller_timeout = row[0] if row else "0"
        previous = installed_version(conn, audit_schema)
        if previous is not None and previous > SCHEMA_VERSION:
            raise SchemaError(
                f"audit schema {audit_schema!r} is at version {previous}, newer than this release's "
                f"{SCHEMA_VERSION}: upgrade the threadline package"
            )
        refreshed = previous == SCHEMA_VERSION and _comment_differs(conn, audit_schema)
        if previous is not None and (previous != SCHEMA_VERSION or refreshed):
            _require_owner(conn, audit_schema, "upgrade" if previous != SCHEMA_VERSION else "refresh")
        if previous != SCHEMA_VERSION or refreshed or _may_add_event_triggers(conn, audit_schema):
            conn.execute(install_sql(audit_schema, partition_by=partition_by).encode())
        if app_role is not None:
            grant_app_role(conn, app_role, audit_schema)
        follows = conn.execute(
            sql.SQL("SELECT {}.follows_ddl()").format(sql.Identifier(audit_schema))
        ).fetchone()
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [caller_timeout])
        conn.execute("SELECT set_config('search_path', %s, true)", [path[0] if path else ""])
    return InstallResult(audit_schema, previous, SCHEMA_VERSION, bool(follows and follows[0]), refreshed)


def _may_add_event_triggers(conn: psycopg.Connection, audit_schema: str) -> bool:
    """A current schema installed without event triggers, and a superuser installing now."""
    row = conn.execute(
        sql.SQL(
            "SELECT NOT {}.follows_ddl() AND (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        ).format(sql.Identifier(audit_schema))
    ).fetchone()
    return bool(row and row[0])


def _require_owner(conn: psycopg.Connection, audit_schema: str, what: str) -> None:
    """Raise :class:`SchemaError` unless the current role may replace the audit schema's objects
    (it owns the schema, is a member of its owner, or is a superuser)."""
    row = conn.execute(
        "SELECT pg_get_userbyid(n.nspowner), pg_has_role(current_user, n.nspowner, 'USAGE')"
        "  FROM pg_namespace n WHERE n.nspname = %s",
        [audit_schema],
    ).fetchone()
    if row is not None and not row[1]:
        raise SchemaError(
            f"audit schema {audit_schema!r} belongs to role {row[0]!r}: to {what} it, run "
            f"`threadline install` as that role (or a superuser); nothing was changed"
        )


def written_by_another_build(conn: psycopg.Connection, audit_schema: str = DEFAULT_SCHEMA) -> bool:
    """True when the audit schema is at this release's version but its install script came from
    another build of it (its functions, capture code or indexes may differ): :func:`install`
    then runs the script again (``InstallResult.refreshed``)."""
    check_schema_name(audit_schema)
    return installed_version(conn, audit_schema) == SCHEMA_VERSION and _comment_differs(conn, audit_schema)


def _comment_differs(conn: psycopg.Connection, audit_schema: str) -> bool:
    """The comment the install script leaves on ``schema_version`` is not this build's."""
    row = conn.execute(
        "SELECT obj_description(format('%%I.schema_version', %s::text)::regclass, 'pg_class')",
        [audit_schema],
    ).fetchone()
    return row is None or row[0] != _script_comment(SCHEMA_VERSION)


def require_installed(conn: psycopg.Connection, audit_schema: str = DEFAULT_SCHEMA) -> None:
    """Raise :class:`SchemaError` unless the audit schema is installed at this release's version."""
    version = installed_version(conn, audit_schema)
    if version is None:
        raise SchemaError(f"audit schema {audit_schema!r} is not installed: run `threadline install` first")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"audit schema {audit_schema!r} is at version {version}, this release needs "
            f"{SCHEMA_VERSION}: run `threadline install` to upgrade"
        )
