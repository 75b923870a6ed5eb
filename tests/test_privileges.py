"""Least privilege: an application role reads the audit tables but cannot write them; capture,
running as the owner, still records its writes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ActorRef, ddl
from threadline.core.errors import PrivilegeError
from threadline.ops.baseline import take_baseline

from .conftest import changed_before, changes
from .test_cli import run

AUDIT_TABLES = ("transactions", "changes", "truncates", "actions")
CONTEXT_1 = '{"actor":{"id":"1","type":"user"},"v":1}'
CONTEXT_2 = '{"actor":{"id":"2","type":"user"},"v":1}'


@pytest.fixture
def app_role(conn: psycopg.Connection[Any], posts: str) -> Iterator[str]:
    """A LOGIN role with full rights on app.posts and, after install(app_role=...), read-only audit tables."""
    role = f"tl_app_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(ident))
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON app.posts TO {}").format(ident))
    ddl.install(conn, app_role=role)
    try:
        yield role
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@pytest.fixture
def bare_role(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A LOGIN role with no rights at all, dropped (with what it owns) after use."""
    role = f"tl_bare_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    try:
        yield role
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@pytest.fixture
def app(dsn: str, app_role: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=app_role), autocommit=True) as c:
        yield c


@pytest.mark.parametrize("table", AUDIT_TABLES)
@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO threadline.{t} DEFAULT VALUES",
        "UPDATE threadline.{t} SET {c} = {c}",
        "DELETE FROM threadline.{t}",
        "TRUNCATE threadline.{t}",
    ],
    ids=["insert", "update", "delete", "truncate"],
)
def test_app_role_cannot_write_audit_tables(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], table: str, statement: str
) -> None:
    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'x')")  # something to change
    if table == "actions" and statement.startswith("INSERT"):
        pytest.skip("recording actions is the application's job: INSERT on actions is granted")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(
            statement.format(
                t=table,
                c={
                    "transactions": "origin",
                    "changes": "after",
                    "truncates": "table_name",
                    "actions": "name",
                }[table],
            )
        )
    assert app.execute(f"SELECT count(*) FROM threadline.{table}").fetchone() is not None  # reads work


def test_app_role_cannot_forge_a_transactions_row(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(
            "INSERT INTO threadline.transactions (actor, correlation_id, occurred_at)"
            ' VALUES (\'{"type": "user", "id": "1"}\', \'forged\', now() - interval \'1 year\')'
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(
            "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op) VALUES (1, 'app', 'posts', 'insert')"
        )
    assert conn.execute("SELECT count(*) FROM threadline.transactions").fetchone() == (0,)


def test_capture_still_works_for_the_app_role(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    with threadline.context(actor=ActorRef.user("42"), correlation_id="req-priv", origin="web"):
        with threadline.transaction(app):
            app.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
            app.execute("UPDATE app.posts SET title = 'b' WHERE id = 1")
        with threadline.transaction(app):
            app.execute("DELETE FROM app.posts WHERE id = 1")
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["insert", "update", "delete"]
    assert {r["correlation_id"] for r in rows} == {"req-priv"}
    assert rows[0]["actor"] == {"type": "user", "id": "42"}
    # a context changed after the first write still wins at commit (the deferred refresh runs as owner)
    with threadline.transaction(app):
        app.execute("INSERT INTO app.posts (id) VALUES (2)")
        app.execute(
            "SELECT set_config('threadline.context', %s, true)", ['{"v": 1, "correlation_id": "late"}']
        )
    assert changes(conn)[-1]["correlation_id"] == "late"
    # a truncate by the app role records its change and its entry in truncates (as the owner)
    with threadline.context(correlation_id="req-trunc"), threadline.transaction(app):
        app.execute("TRUNCATE app.posts")
    (truncate,) = [r for r in changes(conn) if r["op"] == "truncate"]
    assert truncate["correlation_id"] == "req-trunc"
    assert app.execute("SELECT change_id FROM threadline.truncates").fetchall() == [(truncate["id"],)]
    # the owner's half of that refresh rewrites the calling transaction's own row and no other
    earlier = changes(conn)[0]["transaction_id"]
    with threadline.transaction(app):
        app.execute(
            "SELECT set_config('threadline.context', %s, true)", ['{"v": 1, "correlation_id": "forged"}']
        )
        app.execute("SELECT threadline.apply_context_change(%s)", [earlier])
    assert {r["correlation_id"] for r in changes(conn) if r["transaction_id"] == earlier} == {"req-priv"}
    # the app may read the trail and record (append) actions, linked through link_action()
    with app.transaction():
        app.execute("INSERT INTO app.posts (id) VALUES (3)")
        action = app.execute(
            "INSERT INTO threadline.actions (name) VALUES ('publish') RETURNING id"
        ).fetchone()
        assert action is not None
        app.execute("SELECT threadline.link_action(%s)", [action[0]])
    assert (
        conn.execute("SELECT action_id FROM threadline.transactions ORDER BY id DESC LIMIT 1").fetchone()
        == action
    )


def test_capture_ignores_the_callers_search_path(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], app_role: str
) -> None:
    conn.execute("CREATE SCHEMA evil")
    conn.execute(
        "CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{\"forged\": true}'::jsonb $$"
    )
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA evil TO {}").format(sql.Identifier(app_role)))
    try:
        app.execute("SET search_path = evil, pg_catalog, app")
        app.execute("INSERT INTO app.posts (id, title) VALUES (7, 'real')")
        assert changes(conn)[-1]["after"]["title"] == "real"
    finally:
        conn.execute("DROP SCHEMA evil CASCADE")
    definer = conn.execute(
        "SELECT bool_and(prosecdef), bool_and(proconfig[1] LIKE 'search_path=pg_catalog,%%pg_temp')"
        "  FROM pg_proc WHERE pronamespace = 'threadline'::regnamespace"
        "   AND (proname LIKE 'capture\\_%%' OR proname IN ('apply_context_change', 'link_action'))"
    ).fetchone()
    assert definer == (True, True)
    inlinable = conn.execute(
        "SELECT bool_or(prosecdef OR proconfig IS NOT NULL) FROM pg_proc"
        " WHERE pronamespace = 'threadline'::regnamespace AND proname IN ('decode_context', 'cached_transaction_id', 'current_transaction_id')"
    ).fetchone()
    assert inlinable == (False,)


def test_install_refuses_unknown_superuser_and_owner_roles(conn: psycopg.Connection[Any], dsn: str) -> None:
    with pytest.raises(PrivilegeError, match="does not exist"):
        ddl.install(conn, app_role="no_such_role_" + uuid.uuid4().hex[:6])
    with pytest.raises(PrivilegeError, match="superuser"):
        ddl.install(conn, app_role="postgres")
    printed = ddl.schema.install_sql(app_role='odd "name"')
    assert 'GRANT SELECT ON ALL TABLES IN SCHEMA "threadline" TO "odd ""name"""' in printed
    res = run("install", "--app-role", "no_such_role_x", "--dsn", dsn)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_install_cli_grants(dsn: str, app_role: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA threadline FROM {}").format(sql.Identifier(app_role))
    )
    res = run("install", "--app-role", app_role, "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    granted = conn.execute(
        "SELECT table_name, string_agg(privilege_type, ',' ORDER BY privilege_type)"
        "  FROM information_schema.role_table_grants WHERE grantee = %s AND table_schema = 'threadline'"
        "   AND NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        "                    WHERE n.nspname = table_schema AND c.relname = table_name AND c.relispartition)"
        " GROUP BY 1 ORDER BY 1",
        [app_role],
    ).fetchall()
    assert granted == [
        ("actions", "SELECT"),  # and INSERT on the columns an action gives (see below)
        ("baselines", "SELECT"),
        ("changes", "SELECT"),
        ("dropped_tables", "SELECT"),
        ("partitioning", "SELECT"),
        ("schema_version", "SELECT"),
        ("seals", "SELECT"),
        ("task_runs", "SELECT"),
        ("tracked_table_names", "SELECT"),
        ("tracked_tables", "SELECT"),
        ("transactions", "SELECT"),
        ("truncates", "SELECT"),
    ]


def test_app_role_cannot_choose_ids_or_backdate_actions(app: psycopg.Connection[Any]) -> None:
    # an id taken ahead of the identity would make the next inserts fail; a time given would
    # backdate an action
    for statement in (
        "INSERT INTO threadline.actions (id, name) OVERRIDING SYSTEM VALUE VALUES (1000000, 'ahead')",
        "INSERT INTO threadline.actions (name, inserted_at) VALUES ('old', now() - interval '1 year')",
        "INSERT INTO threadline.task_runs (id, task_id, outcome, ended_at) OVERRIDING SYSTEM VALUE"
        " VALUES (1000000, 't', 'succeeded', now())",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(statement)
    # what the application records still goes in
    action = threadline.record_action(app, "publish", actor=ActorRef.user("1"), reason="r")
    assert action.id is not None
    app.execute(
        "INSERT INTO threadline.task_runs (task_id, name, attempt, outcome, error, correlation_id,"
        " causation_id, parent_id, root_id, actor, worker, started_at, ended_at)"
        " VALUES ('t', 'n', 0, 'succeeded', NULL, 'c', NULL, NULL, NULL, NULL, 'w', now(), now())"
    )


def test_app_defined_functions_never_run_inside_capture(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], app_role: str
) -> None:
    # the application owns a schema, an enum type in it, and a tracked table using that type;
    # it then plants a better-matching overload of a function the capture code calls
    ident = sql.Identifier(app_role)
    conn.execute(sql.SQL("CREATE SCHEMA appowned AUTHORIZATION {}").format(ident))
    try:
        app.execute("CREATE TYPE appowned.mood AS ENUM ('ok', 'sad')")
        app.execute("CREATE TABLE appowned.tt (id int PRIMARY KEY, m appowned.mood, n int)")
        ddl.track(conn, "appowned.tt")
        config = conn.execute(
            "SELECT p.proconfig FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 'appowned.tt'::regclass LIMIT 1"
        ).fetchone()
        assert config == (["search_path=pg_catalog, pg_temp"],)
        app.execute(
            "CREATE FUNCTION appowned.jsonb_build_object(text, integer) RETURNS jsonb LANGUAGE sql"
            " AS $$ DELETE FROM threadline.changes RETURNING '{}'::jsonb $$"
        )
        app.execute(
            "CREATE FUNCTION appowned.to_jsonb(appowned.tt) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$"
        )
        with threadline.context(actor="user:1"), threadline.transaction(app):
            app.execute("INSERT INTO app.posts (id, title) VALUES (1, 'kept')")
        with threadline.context(actor="user:1"), threadline.transaction(app):
            app.execute("INSERT INTO appowned.tt VALUES (1, 'ok', 1)")
            app.execute("UPDATE appowned.tt SET m = 'sad'")
        rows = changes(conn)
        assert [(r["table_name"], r["op"]) for r in rows] == [
            ("posts", "insert"),
            ("tt", "insert"),
            ("tt", "update"),
        ]
        assert rows[1]["pk"] == {"id": 1} and rows[1]["after"] == {"id": 1, "m": "ok", "n": 1}
        assert rows[2]["changed_fields"] == ["m"] and changed_before(rows[2]) == {"m": "ok"}
    finally:
        conn.execute("DROP SCHEMA appowned CASCADE")


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "drift_safe"])
def test_casts_the_application_defines_never_run_inside_capture(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], app_role: str, typed: bool
) -> None:
    # Capture runs as the audit schema's owner. A type the application owns may carry a cast to
    # json or text (to_json() and ::text call it), so the capture code must render such values
    # through their output function: each cast below would log the role it ran as and lie.
    # Drift-safe code is what a table typed code cannot serve gets where the event triggers run.
    ident = sql.Identifier(app_role)
    conn.execute(sql.SQL("CREATE SCHEMA appowned AUTHORIZATION {}").format(ident))
    try:
        app.execute("CREATE TABLE appowned.calls (who text, what text)")
        app.execute("CREATE SEQUENCE appowned.cast_calls")  # counts calls a rollback undoes too
        app.execute("CREATE TYPE appowned.mood AS ENUM ('ok', 'sad')")
        app.execute("CREATE TYPE appowned.tagged AS (n int, m appowned.mood, d date)")
        app.execute("CREATE TYPE appowned.plain AS (a int, b text)")
        app.execute(
            "CREATE TABLE appowned.tt (id int PRIMARY KEY, m appowned.mood, ms appowned.mood[],"
            " t appowned.tagged, p appowned.plain, n int)"
        )
        app.execute("CREATE TABLE appowned.tk (k appowned.mood PRIMARY KEY, n int)")
        app.execute("CREATE TABLE appowned.tx (id int PRIMARY KEY, m appowned.mood, n int)")
        ddl.track(conn, "appowned.tt")
        ddl.track(conn, "appowned.tk")
        ddl.track(conn, "appowned.tx", exclude=["m"])
        if not typed:
            conn.execute(
                "SELECT threadline.regenerate(id, false) FROM threadline.tracked_tables"
                " WHERE table_schema = 'appowned'"
            )
        for source in ("appowned.mood", "appowned.mood[]", "appowned.tagged", "appowned.plain"):
            name = source.replace("appowned.", "").replace("[]", "_array")
            for target in ("json", "text"):
                app.execute(
                    f"CREATE FUNCTION appowned.{name}_{target}({source}) RETURNS {target} LANGUAGE sql"
                    f" AS $$ SELECT nextval('appowned.cast_calls');"
                    f" INSERT INTO appowned.calls VALUES (current_user, '{name}_{target}')"
                    f" RETURNING '\"lie\"'::{target} $$"
                )
                app.execute(
                    f"CREATE CAST ({source} AS {target}) WITH FUNCTION appowned.{name}_{target}({source})"
                )
        # the casts are real: an explicit conversion calls them
        assert app.execute("SELECT to_json('ok'::appowned.mood)::text").fetchone() == ('"lie"',)
        app.execute("DELETE FROM appowned.calls")
        app.execute("SELECT setval('appowned.cast_calls', 1, false)")
        app.execute("SET DateStyle = 'SQL, DMY'")  # a composite's text would print its date so
        with threadline.context(actor="user:1", correlation_id="req-casts"), threadline.transaction(app):
            app.execute(
                "INSERT INTO appowned.tt VALUES (1, 'ok', '{ok}', '(1,ok,2024-03-04)', '(1,x)', 1),"
                " (2, 'ok', '{ok}', '(2,ok,)', '(2,y)', 2)"
            )
            app.execute("UPDATE appowned.tt SET m = 'sad' WHERE id = 1")  # one row
            app.execute("UPDATE appowned.tt SET ms = '{ok,sad}', t = '(9,sad,)', p = '(9,z)'")  # rows paired
            app.execute("UPDATE appowned.tt SET n = n")  # nothing changed
            app.execute("DELETE FROM appowned.tt WHERE id = 2")
            app.execute("INSERT INTO appowned.tk VALUES ('ok', 1), ('sad', 2)")
            app.execute("DELETE FROM appowned.tk WHERE k = 'ok'")
            app.execute("INSERT INTO appowned.tx VALUES (1, 'ok', 1)")
            app.execute("UPDATE appowned.tx SET n = 2")
        app.execute("RESET DateStyle")
        assert app.execute("SELECT who, what FROM appowned.calls").fetchall() == []
        assert app.execute("SELECT is_called FROM appowned.cast_calls").fetchone() == (False,)
        rows = [r for r in changes(conn) if r["table_schema"] == "appowned"]
        assert [(r["table_name"], r["op"]) for r in rows] == [
            ("tt", "insert"), ("tt", "insert"), ("tt", "update"), ("tt", "update"), ("tt", "update"),
            ("tt", "delete"), ("tk", "insert"), ("tk", "insert"), ("tk", "delete"), ("tx", "insert"),
            ("tx", "update"),
        ]  # fmt: skip
        assert rows[0]["after"] == {
            "id": 1, "m": "ok", "ms": "{ok}", "t": "(1,ok,2024-03-04)", "p": {"a": 1, "b": "x"}, "n": 1,
        }  # fmt: skip
        assert rows[2]["changed_fields"] == ["m"] and changed_before(rows[2])["m"] == "ok"
        assert rows[2]["after"]["m"] == "sad"
        paired = {r["pk"]["id"]: r for r in rows[3:5]}
        assert sorted(paired[1]["changed_fields"]) == ["ms", "p", "t"]
        assert changed_before(paired[1]) == {"ms": "{ok}", "t": "(1,ok,2024-03-04)", "p": {"a": 1, "b": "x"}}
        assert paired[2]["after"]["t"] == "(9,sad,)" and paired[2]["after"]["p"] == {"a": 9, "b": "z"}
        assert rows[5]["before"]["t"] == "(9,sad,)"
        assert [r["pk"] for r in rows[6:9]] == [{"k": "ok"}, {"k": "sad"}, {"k": "ok"}]
        assert rows[10]["after"] == {"id": 1, "n": 2}
        # reverting reads the rows as they are now, as the role that reverts: no cast either
        plan = threadline.revert(conn, correlation_id="req-casts", dry_run=True).plan
        assert sorted((s.action, s.table) for s in plan.steps) == [
            ("delete", "appowned.tk"), ("delete", "appowned.tt"), ("delete", "appowned.tx")
        ]  # fmt: skip
        assert app.execute("SELECT who, what FROM appowned.calls").fetchall() == []
        assert app.execute("SELECT is_called FROM appowned.cast_calls").fetchone() == (False,)
        # baselines, taken by the owner in batches of one row (each resuming after the last key),
        # write the same images without calling the casts either
        for table in ("appowned.tt", "appowned.tk", "appowned.tx"):
            take_baseline(conn, table, batch_size=1)
        assert app.execute("SELECT who, what FROM appowned.calls").fetchall() == []
        assert app.execute("SELECT is_called FROM appowned.cast_calls").fetchone() == (False,)
        snapshots = conn.execute(
            "SELECT table_name, pk, after FROM threadline.changes WHERE op = 'snapshot' ORDER BY table_name, id"
        ).fetchall()
        assert snapshots == [
            ("tk", {"k": "sad"}, {"k": "sad", "n": 2}),
            (
                "tt",
                {"id": 1},
                {"id": 1, "m": "sad", "ms": "{ok,sad}", "t": "(9,sad,)", "p": {"a": 9, "b": "z"}, "n": 1},
            ),
            ("tx", {"id": 1}, {"id": 1, "n": 2}),
        ]
    finally:
        conn.execute("DROP SCHEMA appowned CASCADE")


@pytest.mark.parametrize(
    "call",
    [
        "transaction_id()",
        "transaction_row()",
        "insert_transaction_row()",
        "insert_transaction_row(1)",
        "current_row()",
        "next_transaction_id()",
        "define_next_transaction_id()",
    ],
)
def test_app_role_cannot_create_transaction_rows_directly(app: psycopg.Connection[Any], call: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(f"SELECT threadline.{call}")


def test_the_app_role_cannot_seal_or_rewrite_seals(app: psycopg.Connection[Any]) -> None:
    for statement in (
        "SELECT * FROM threadline.seal(10)",
        "INSERT INTO threadline.seals (transaction_ids, digests, changes, hash) VALUES ('{}', '', 0, '')",
        "DELETE FROM threadline.seals",
        "SELECT * FROM threadline.baseline_batch('threadline.changes'::regclass, 10)",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(statement)
        app.rollback()


def test_the_app_role_cannot_refresh_the_schema_and_is_told_who_can(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    # a store written by another build: only its owner (or a superuser) may replace its objects
    conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0000'")
    owner = conn.execute("SELECT current_user").fetchone()
    with pytest.raises(
        threadline.core.errors.SchemaError, match=f"belongs to role '{owner[0]}'.*nothing was changed"
    ):
        ddl.install(app)
    comment = "SELECT obj_description('threadline.schema_version'::regclass, 'pg_class')"
    assert conn.execute(comment).fetchone() == ("threadline audit schema 7, script 0000",)
    assert ddl.install(conn).refreshed


def test_a_role_that_cannot_see_the_audit_schema_changes_its_context_before_commit(
    conn: psycopg.Connection[Any], dsn: str, posts: str, bare_role: str
) -> None:
    # installed without an application role: the writer has rights on its table only, not even
    # USAGE on the audit schema; the commit-time check must still apply the last context
    role, ident = bare_role, sql.Identifier(bare_role)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(ident))
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON app.posts TO {}").format(ident))
    conn.execute(sql.SQL("CREATE SCHEMA evil AUTHORIZATION {}").format(ident))
    with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, user=role), autocommit=True) as bare:
        assert bare.execute("SELECT has_schema_privilege('threadline', 'USAGE')").fetchone() == (False,)
        # the check runs as the owner: what the writer's search_path finds first must not run
        bare.execute("CREATE TABLE evil.calls (what text)")
        for signature, body in [
            ("eq(text, text) RETURNS boolean", "SELECT false"),
            ("concat(text, bigint, text, text) RETURNS text", "SELECT ''"),
            ("current_setting(text, boolean) RETURNS text", "SELECT ''"),
        ]:
            name = signature.split("(")[0]
            bare.execute(
                f"CREATE FUNCTION evil.{signature} LANGUAGE sql"
                f" AS $$ INSERT INTO evil.calls VALUES ('{name}'); {body} $$"
            )
        bare.execute("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq)")
        bare.execute("SET search_path = evil, pg_catalog")
        with bare.transaction():
            bare.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT_1])
            bare.execute("INSERT INTO app.posts (id, title) VALUES (1, 'a')")
            bare.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT_2])
        with bare.transaction():  # a cleared marker: the second row merges into the first
            bare.execute("SELECT set_config('threadline.context', %s, true)", [CONTEXT_1])
            bare.execute("UPDATE app.posts SET title = 'b'")
            bare.execute("SELECT set_config('threadline.txctx_threadline', '', true)")
            bare.execute("UPDATE app.posts SET title = 'c'")
    assert conn.execute("SELECT title FROM app.posts").fetchall() == [("c",)]
    assert conn.execute("SELECT what FROM evil.calls").fetchall() == []
    rows = conn.execute(
        "SELECT t.actor ->> 'id', count(c.id) FROM threadline.transactions t"
        " JOIN threadline.changes c ON c.transaction_id = t.id GROUP BY t.id, t.actor ORDER BY t.id"
    ).fetchall()
    assert rows == [("2", 1), ("1", 2)]


def test_an_auditor_without_grants_is_told_which_it_needs_and_reads_once_granted(
    dsn: str, posts: str, bare_role: str
) -> None:
    as_auditor = psycopg.conninfo.make_conninfo(dsn, user=bare_role)
    refused = run("timeline", "--limit", "1", "--dsn", as_auditor)
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    assert "threadline install --app-role" in refused.stderr, refused.stderr
    assert run("install", "--app-role", bare_role, "--dsn", dsn).returncode == 0
    for args in (("timeline", "--limit", "1"), ("verify",), ("coverage",)):
        res = run(*args, "--dsn", as_auditor)
        assert res.returncode in (0, 1) and "permission denied" not in res.stderr, (args, res.stderr)


def test_the_app_role_verifies_without_reading_the_seal_salts(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    from threadline.ops.seal import seal, verify

    conn.execute("INSERT INTO app.posts (id, title) VALUES (1, 'x')")
    seal(conn)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute("SELECT * FROM threadline.seal_salts")
    assert verify(app).ok


def test_install_runs_nothing_of_a_schema_on_the_installers_search_path(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], app_role: str
) -> None:
    # PostgreSQL 15 gives the public schema to the database's owner, often the application's
    # role: functions it plants there that fit a call better than the built-in would run as the
    # role that installs (a superuser) when public is on that role's search_path
    conn.execute(sql.SQL("CREATE SCHEMA appowned AUTHORIZATION {}").format(sql.Identifier(app_role)))
    try:
        app.execute("CREATE TABLE appowned.calls (who text, what text)")
        app.execute("GRANT INSERT ON appowned.calls TO PUBLIC")
        for signature, call in [
            ("format(f text, a text)", "pg_catalog.format(f, a)"),
            ("format(f text, a regclass, b text)", "pg_catalog.format(f, a, b)"),
            ("format(f text, a text, b text)", "pg_catalog.format(f, a, b)"),
        ]:
            app.execute(
                f"CREATE FUNCTION appowned.{signature} RETURNS text"
                f" LANGUAGE sql AS $$ INSERT INTO appowned.calls VALUES (current_user, {signature!r});"
                f" SELECT {call} $$"
            )
        conn.execute("SET search_path = appowned, pg_catalog, app")
        # a refresh runs the whole script (as an upgrade does), also its uninstall refusal
        conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0000'")
        assert ddl.install(conn, app_role=app_role).refreshed
        with conn.transaction():
            conn.execute(ddl.install_sql().encode())
            conn.execute(ddl.uninstall.refuse_with_rows_sql("no_such_audit_schema").encode())
            assert conn.execute("SHOW search_path").fetchone() == ("appowned, pg_catalog, app",)
        assert conn.execute("SHOW search_path").fetchone() == ("appowned, pg_catalog, app",)
        assert conn.execute("SELECT who, what FROM appowned.calls").fetchall() == []
    finally:
        conn.execute("RESET search_path")
        conn.execute("DROP SCHEMA appowned CASCADE")


def test_install_waits_for_no_table_whose_trigger_only_has_a_capture_triggers_name(
    app: psycopg.Connection[Any], conn: psycopg.Connection[Any], app_role: str
) -> None:
    # an upgrade first locks the tables whose capture code it replaces: a role that may create a
    # table must not hold every upgrade back with a trigger of that name on a table it locks
    conn.execute(sql.SQL("GRANT CREATE ON SCHEMA app TO {}").format(sql.Identifier(app_role)))
    app.execute("CREATE TABLE app.trap (id int)")
    app.execute("CREATE FUNCTION app.nop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
    app.execute(
        "CREATE TRIGGER threadline_capture_insert AFTER INSERT ON app.trap FOR EACH STATEMENT"
        " EXECUTE FUNCTION app.nop()"
    )
    conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0000'")
    with app.transaction():
        app.execute("LOCK TABLE app.trap IN ACCESS EXCLUSIVE MODE")
        assert ddl.install(conn, lock_timeout=0.2, attempts=1).refreshed
