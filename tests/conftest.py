"""Shared fixtures: a throw-away PostgreSQL database per test session, with the audit schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ddl
from threadline.explore.selection import changed_fields_sql

from . import brokers
from .backends import ADMIN_DSN, report


def pytest_report_header() -> list[str]:
    """Say which PostgreSQL (configured or embedded), brokers and result backend this run uses."""
    return [report(), *brokers.report()]


STORE_LAYOUT = os.environ.get("THREADLINE_TEST_LAYOUT", "month")
"""How the session database's audit store is laid out: a partition period, or ``plain`` (the
version matrix runs the plain layout, the main suite the default)."""


def _dsn_for(dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=dbname)


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """DSN of a fresh database, created for this session and dropped after it."""
    name = f"threadline_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:  # never skip silently: the core suite needs it
        pytest.exit(f"PostgreSQL is not reachable at {ADMIN_DSN}: {exc}", returncode=3)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _dsn_for(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ddl.install(conn, partition_by=None if STORE_LAYOUT == "plain" else STORE_LAYOUT)
    try:
        yield dsn
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def store_database(
    partition_by: str | None, prefix: str = "threadline_store", encoding: str | None = None
) -> Iterator[str]:
    """DSN of a new database (in ``encoding``, default the server's) with an audit store of the
    given layout (``None``: plain tables) and a tracked table ``items (id int PRIMARY KEY, v text)``,
    dropped after use."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        if encoding is None:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            admin.execute(
                sql.SQL(
                    "CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
                ).format(sql.Identifier(name), sql.Literal(encoding))
            )
    dsn = _dsn_for(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn, partition_by=partition_by)
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
            ddl.track(conn, "items")
        yield dsn
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dsn(database: str) -> Iterator[str]:
    """The session database, with empty audit tables and a fresh ``app`` schema for the test."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE threadline.changes, threadline.transactions, threadline.actions, threadline.task_runs,"
            " threadline.baselines, threadline.seals, threadline.seal_salts, threadline.truncates"
        )
        conn.execute("DROP SCHEMA IF EXISTS app CASCADE")
        # the masks a dropped (or untracked) table leaves for one of its name are not the next test's
        conn.execute("DELETE FROM threadline.dropped_tables")
        conn.execute("CREATE SCHEMA app")
    yield psycopg.conninfo.make_conninfo(database, options="-c search_path=app,public")


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database (search_path ``app, public``)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def changes(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """All captured changes joined with their transaction, oldest first."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        """
        SELECT c.*, t.actor, t.correlation_id, t.request_id, t.causation_id, t.origin, t.job,
               t.meta, t.context_error, t.xid, c.changed_fields AS stored_changed_fields,
               {changed} AS changed_fields
          FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
         ORDER BY c.id
        """.replace("{changed}", changed_fields_sql(sql.Identifier("threadline")).as_string(conn))
    ).fetchall()


def key_indexes(conn: psycopg.Connection[Any], audit_schema: str = "threadline") -> list[str]:
    """``"<name> <access method>"`` of every index on the audit schema's ``changes`` over ``pk``."""
    row = conn.execute(
        "SELECT array_agg(c.relname::text || ' ' || a.amname ORDER BY c.relname) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam"
        " WHERE i.indrelid = format('%%I.changes', %s::text)::regclass"
        " AND pg_get_indexdef(i.indexrelid) LIKE '%%(pk)%%'",
        [audit_schema],
    ).fetchone()
    return list(row[0] or []) if row else []


def transactions(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """All transaction rows, oldest first."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM threadline.transactions ORDER BY id").fetchall()


@pytest.fixture
def posts(conn: psycopg.Connection[Any]) -> str:
    """A tracked table ``app.posts``."""
    conn.execute(
        "CREATE TABLE app.posts (id int PRIMARY KEY, title text, body text, secret text, views int DEFAULT 0)"
    )
    threadline.ddl.track(conn, "app.posts")
    return "app.posts"


@pytest.fixture
def story(conn: psycopg.Connection[Any], dsn: str, posts: str) -> Any:
    """The audited story of ``tests/story.py``: a web request and its Celery tasks."""
    from .story import write_story

    return write_story(conn, dsn)


def changed_before(change: Any) -> dict[str, Any]:
    """The prior values of the columns an update changed (a change row's dict or a Change)."""
    if isinstance(change, dict):
        return {k: change["before"][k] for k in change["changed_fields"]}
    return {k: change.before[k] for k in change.changed_fields}


def age_audit_rows(conn: psycopg.Connection[Any], interval: str, transaction_ids: str | None = None) -> None:
    """Make audit rows look older by ``interval`` (SQL text, such as ``'100 days'``): the changes'
    capture times and start times (and their entries in ``truncates``) and their transactions'
    start times alike, as if written then
    (``transaction_ids``: a SQL subquery naming which transactions; all when ``None``)."""
    which = "TRUE" if transaction_ids is None else f"transaction_id IN ({transaction_ids})"
    shift_start = ", occurred_at = occurred_at - %(i)s::interval" if _partitioned(conn) else ""
    conn.execute(
        f"UPDATE threadline.changes SET captured_at = captured_at - %(i)s::interval{shift_start} WHERE {which}",
        {"i": interval},
    )
    conn.execute(
        "UPDATE threadline.truncates SET captured_at = captured_at - %(i)s::interval,"
        f" occurred_at = occurred_at - %(i)s::interval WHERE {which}",
        {"i": interval},
    )
    which = "TRUE" if transaction_ids is None else f"id IN ({transaction_ids})"
    conn.execute(
        f"UPDATE threadline.transactions SET occurred_at = occurred_at - %(i)s::interval WHERE {which}",
        {"i": interval},
    )


def sync_change_starts(conn: psycopg.Connection[Any]) -> None:
    """After a test moved transactions' start times: in a partitioned store, give each change its
    transaction's start time again (the partition key they share), and each entry of
    ``truncates`` too."""
    if _partitioned(conn):
        conn.execute(
            "UPDATE threadline.changes c SET occurred_at = t.occurred_at FROM threadline.transactions t"
            " WHERE t.id = c.transaction_id AND c.occurred_at <> t.occurred_at"
        )
    conn.execute(
        "UPDATE threadline.truncates x SET occurred_at = t.occurred_at FROM threadline.transactions t"
        " WHERE t.id = x.transaction_id AND x.occurred_at <> t.occurred_at"
    )


def _partitioned(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = 'threadline.changes'::regclass"
    ).fetchone()
    return bool(row and row[0])
