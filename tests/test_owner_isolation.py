"""Code that another role wrote never runs with the rights of the audit schema's owner, and what
that owner reads of a table shows every row or fails: domains, row-level security policies."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from threadline import ddl
from threadline.core.errors import TrackingError
from threadline.ops import health
from threadline.ops.baseline import take_baseline

Conn = psycopg.Connection[Any]


@pytest.fixture
def other_role(conn: Conn) -> Iterator[str]:
    """A LOGIN role that owns what it creates in ``app`` (a table owner who is not the audit
    schema's owner), dropped with what it owns after use."""
    role = f"tl_other_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA app TO {}").format(ident))
    try:
        yield role
    finally:
        conn.execute("DROP SCHEMA IF EXISTS app CASCADE")
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def _as(conn: Conn, role: str, statement: str) -> None:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        conn.execute(statement)
    finally:
        conn.execute("RESET ROLE")


def _calls(conn: Conn) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute("SELECT who, what FROM app.calls ORDER BY 1, 2").fetchall()]


def test_a_baseline_never_checks_a_domain_key_as_the_owner(conn: Conn, other_role: str) -> None:
    # Each batch after the first reads the last key back: as the key's domain, its check (a
    # function of the domain's owner) would run as the audit schema's owner (here a superuser).
    _as(
        conn,
        other_role,
        "CREATE TABLE app.calls (who text, what text);"
        " GRANT INSERT, SELECT ON app.calls TO PUBLIC;"
        " CREATE FUNCTION app.spy(int) RETURNS boolean LANGUAGE sql"
        "  AS $$ INSERT INTO app.calls VALUES (current_user, 'check'); SELECT true $$;"
        " CREATE DOMAIN app.key AS int CHECK (app.spy(VALUE));"
        " CREATE DOMAIN app.inner_key AS int CHECK (app.spy(VALUE));"
        " CREATE TABLE app.dk (id app.key PRIMARY KEY, v text);"
        " CREATE TABLE app.ak (id app.inner_key[] PRIMARY KEY, v text);"
        " INSERT INTO app.dk SELECT g, 'x' FROM generate_series(1, 5) AS g;"
        " INSERT INTO app.ak VALUES (ARRAY[1]::app.inner_key[], 'x'), (ARRAY[2]::app.inner_key[], 'y');"
        " DELETE FROM app.calls",
    )
    ddl.track(conn, "app.dk")
    ddl.track(conn, "app.ak")
    take_baseline(conn, "app.dk", batch_size=2)
    assert _calls(conn) == []
    snapshots = conn.execute(
        "SELECT pk FROM threadline.changes WHERE op = 'snapshot' AND table_name = 'dk' ORDER BY id"
    ).fetchall()
    assert [r[0] for r in snapshots] == [{"id": n} for n in range(1, 6)]
    # a domain inside a key's type cannot be read as its base type: refused before any batch
    with pytest.raises(TrackingError, match="holds a domain"):
        take_baseline(conn, "app.ak", batch_size=1)
    assert _calls(conn) == []
    assert conn.execute(
        "SELECT count(*) FROM threadline.changes WHERE op = 'snapshot' AND table_name = 'ak'"
    ).fetchone() == (0,)


def test_a_baseline_by_an_owner_that_a_policy_applies_to_fails_without_running_it(
    conn: Conn, other_role: str
) -> None:
    # An audit schema owned by a role that is not a superuser (a managed service): a row-level
    # security policy of the table's owner applies to it, would hide rows from the baseline, and
    # its expression would run with that role's rights (which may write the audit tables).
    owner = f"tl_owner_{uuid.uuid4().hex[:8]}"
    audit = f"tl_audit_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(owner)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    try:
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), ident
        ))  # fmt: skip
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(ident))
        _as(
            conn,
            other_role,
            "CREATE TABLE app.calls (who text, what text);"
            " GRANT INSERT, SELECT ON app.calls TO PUBLIC;"
            " CREATE FUNCTION app.spy() RETURNS boolean LANGUAGE sql"
            "  AS $$ INSERT INTO app.calls VALUES (current_user, 'policy'); SELECT false $$;"
            " CREATE TABLE app.guarded (id int PRIMARY KEY, v text);"
            " INSERT INTO app.guarded SELECT g, 'x' FROM generate_series(1, 3) AS g;"
            " ALTER TABLE app.guarded ENABLE ROW LEVEL SECURITY;"
            " CREATE POLICY hide ON app.guarded USING (app.spy());"
            f" GRANT SELECT, UPDATE, TRIGGER ON app.guarded TO {owner}",
        )
        with psycopg.connect(
            psycopg.conninfo.make_conninfo(conn.info.dsn, user=owner), autocommit=True
        ) as own:
            ddl.install(own, audit)
            ddl.track(own, "app.guarded", audit_schema=audit)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                take_baseline(own, "app.guarded", audit_schema=audit)
        assert _calls(conn) == []
    finally:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(audit)))
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_a_capture_trigger_calls_the_capture_function_or_coverage_says_so(
    conn: Conn, other_role: str
) -> None:
    # A table's owner may replace its triggers. Pointing a capture trigger's name at a trigger
    # function of the audit schema that PUBLIC may execute would leave coverage counting it.
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA threadline TO {}").format(sql.Identifier(other_role)))
    _as(conn, other_role, "CREATE TABLE app.owned (id int PRIMARY KEY, v text)")
    ddl.track(conn, "app.owned")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as(
            conn,
            other_role,
            "CREATE OR REPLACE TRIGGER threadline_capture_insert AFTER INSERT ON app.owned"
            " FOR EACH ROW EXECUTE FUNCTION threadline.refresh_transaction_context()",
        )
    # such a trigger, however it came there, is reported and replaced by sync
    conn.execute(
        "CREATE OR REPLACE TRIGGER threadline_capture_insert AFTER INSERT ON app.owned"
        " FOR EACH ROW EXECUTE FUNCTION threadline.refresh_transaction_context()"
    )
    (entry,) = [t for t in ddl.tracked_tables(conn) if t.table_name == "owned"]
    assert entry.status == "missing" and "call another function" in (entry.detail or "")
    problems = health.check_expected(conn, health.trigger_coverage(conn), ["app.owned"])
    assert problems and "missing" in problems[0]
    ddl.sync(conn)
    conn.execute("INSERT INTO app.owned VALUES (1, 'recorded')")
    assert conn.execute(
        "SELECT count(*) FROM threadline.changes WHERE table_name = 'owned' AND op = 'insert'"
    ).fetchone() == (1,)
