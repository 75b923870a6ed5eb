"""Django set-up: migrations (threadline's own, the audit schema, and ``Track`` on a model whose
table and columns change in later migrations, forwards and back, while another connection keeps
writing), ``manage.py threadline``, and the system checks.

The ``migrations`` database alias of ``tests/djangoproject`` is a database of its own, created
and dropped here; migrations run with ``call_command("migrate", ...)`` as ``manage.py`` would.
The tests are one story in file order: each starts from the state the one before left (run the
module, not one test of it).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline.explore.selection import changed_fields_sql

DSN_ENV = "THREADLINE_TEST_CELERY_DSN"
ALIAS = "migrations"


@pytest.fixture(scope="module")
def mig_dsn(database: str) -> Iterator[str]:
    """A fresh, empty database behind the ``migrations`` alias."""
    old = os.environ.get(DSN_ENV)
    os.environ[DSN_ENV] = database
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")
    import django

    django.setup()
    from django.db import connections

    name = connections.settings[ALIAS]["NAME"]
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(database, dbname=name)
    finally:
        connections[ALIAS].close()
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if old is None:
            os.environ.pop(DSN_ENV, None)
        else:
            os.environ[DSN_ENV] = old


# a project that logs users in: sessions in signed cookies, threadline after authentication
LOGIN_SETTINGS: dict[str, Any] = {
    "MIDDLEWARE": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "threadline.django.ThreadlineMiddleware",
    ],
    "SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies",
}


def migrate(*args: str) -> str:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("migrate", *args, database=ALIAS, stdout=out, verbosity=1)
    return out.getvalue()


class Writer(threading.Thread):
    """Inserts a row every few milliseconds into whichever names the table and its title column
    have now; counts what succeeded and every error that is not a name having moved."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.written = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            while not self.stop.is_set():
                for table, column in (
                    ("shop_order", "title"),
                    ("shop_order", "name"),
                    ("shop_purchase", "name"),
                ):
                    try:
                        conn.execute(
                            sql.SQL("INSERT INTO {} ({}, card) VALUES ('t', '4111111111111111')").format(
                                sql.Identifier(table), sql.Identifier(column)
                            )
                        )
                        self.written += 1
                        break
                    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
                        continue
                    except psycopg.Error as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.003)


def _status(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT table_name, status FROM threadline.tracking_status() ORDER BY 1"
        ).fetchall()


def test_forwards_and_back_while_a_writer_keeps_writing(mig_dsn: str) -> None:
    # the writer starts once the table exists
    out = migrate("shop", "0001")
    assert "Applying threadline.0001_install... OK" in out and "Applying shop.0001_initial... OK" in out
    writer = Writer(mig_dsn)
    writer.start()
    try:
        time.sleep(0.2)
        # add a field, rename one, rename the model, remove a field, add an index concurrently
        # (outside a transaction), under a context as manage.py gives its commands
        with threadline.context(actor="system:deploy", origin="cli"):
            out = migrate("shop")
        assert "Applying shop.0005_remove_note... OK" in out and "Applying shop.0006_name_index... OK" in out
        time.sleep(0.2)
        assert _status(mig_dsn) == [("shop_purchase", "installed")]
        with threadline.context(actor="system:deploy", origin="cli"):
            migrate("shop", "0001")  # back through every step
        time.sleep(0.2)
        assert _status(mig_dsn) == [("shop_order", "installed")]
    finally:
        writer.stop.set()
        writer.join()
    assert writer.errors == [] and writer.written > 50
    with psycopg.connect(mig_dsn) as conn:
        rows = conn.execute(
            "SELECT c.table_name, c.after FROM threadline.changes c WHERE c.op = 'insert'"
        ).fetchall()
    assert len(rows) == writer.written  # every write captured, under each of the table's names
    assert {r[0] for r in rows} == {"shop_order", "shop_purchase"}
    assert all(r[1]["card"] != "4111111111111111" for r in rows)  # masked throughout


def test_sqlmigrate_shows_the_pinned_sql(mig_dsn: str) -> None:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("sqlmigrate", "shop", "0001", database=ALIAS, stdout=out)
    assert 'SELECT * FROM "threadline".track(' in out.getvalue() and "'card'" in out.getvalue()
    out = io.StringIO()
    call_command("sqlmigrate", "shop", "0001", database=ALIAS, backwards=True, stdout=out)
    assert '"threadline".untrack(' in out.getvalue()
    out = io.StringIO()
    call_command("sqlmigrate", "threadline", "0001", database=ALIAS, stdout=out)
    assert "threadline audit schema, version 7" in out.getvalue()


def _applied(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT app, name FROM django_migrations ORDER BY 1, 2").fetchall()


def test_back_to_zero_keeps_a_schema_that_holds_audit_rows(mig_dsn: str) -> None:
    from django.core.management import CommandError
    from django.db import connections

    migrate()  # every app, and the shop's model tracked by its migrations
    applied, tracked = _applied(mig_dsn), _status(mig_dsn)
    assert ("shop", "0006_name_index") in applied and tracked == [("shop_purchase", "installed")]
    # refused before the shop's migrations (which depend on the install) are unapplied
    with pytest.raises(CommandError, match="holds audit rows; it is not dropped") as refused:
        migrate("threadline", "zero")
    assert "(database 'migrations'); no migration was unapplied" in str(refused.value)
    assert 'HINT: purge them first (threadline purge), or drop it by hand: DROP SCHEMA "threadline"' in str(
        refused.value
    )
    assert _applied(mig_dsn) == applied and _status(mig_dsn) == tracked
    migrate("shop", "zero")  # untracks, then drops the table: the audit rows stay
    assert _status(mig_dsn) == []
    with pytest.raises(CommandError, match="holds audit rows; it is not dropped"):
        migrate("threadline", "zero")
    connections[ALIAS].close()
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM threadline.changes").fetchone() != (0,)
        conn.execute("TRUNCATE threadline.changes, threadline.transactions")
    migrate("threadline", "zero")
    with psycopg.connect(mig_dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('threadline')").fetchone() == (None,)
    migrate("shop")  # and forwards again from nothing
    assert _status(mig_dsn) == [("shop_purchase", "installed")]


def _manage(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    env.update({DSN_ENV: database, "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings"})
    return subprocess.run(
        [sys.executable, "-m", "django", "threadline", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "threadline.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_manage_py_threadline_is_the_cli_on_django_databases(database: str, mig_dsn: str) -> None:
    for args in (
        ("coverage",),
        ("coverage", "--expect", "shop_purchase"),
        ("coverage", "--expect", "shop_nothing"),
        ("timeline", "--table", "shop_purchase", "--limit", "3"),
        ("track", "shop_nothing"),
    ):
        managed = _manage(database, *args, "--database", ALIAS)
        direct = _cli(*args, "--dsn", mig_dsn)
        assert (managed.returncode, managed.stdout) == (direct.returncode, direct.stdout), args
        assert managed.stderr.replace("manage.py threadline", "threadline") == direct.stderr, args
    assert _manage(database, "coverage", "--expect", "shop_nothing", "--database", ALIAS).returncode != 0
    # the alias may come first, and "default" is the session database
    assert _manage(database, "--database", ALIAS, "coverage", "--expect", "shop_purchase").returncode == 0
    assert _manage(database, "coverage").stdout == _cli("coverage", "--dsn", database).stdout
    unknown = _manage(database, "coverage", "--database", "nope")
    assert unknown.returncode == 2 and "no database 'nope' in settings.DATABASES" in unknown.stderr
    assert "Usage: manage.py threadline" in _manage(database, "--help").stdout
    missing = _manage(database, "coverage", "--database")
    assert (
        missing.returncode == 2
        and missing.stderr == "Error: --database needs an alias from settings.DATABASES\n"
    )


def _ids(**overrides: Any) -> list[str]:
    from django.core.checks import run_checks
    from django.test import override_settings

    with override_settings(**overrides):
        return sorted(m.id for m in run_checks() if m.id and m.id.startswith("threadline."))


def test_system_checks_name_each_set_up_mistake(mig_dsn: str) -> None:
    auth = "django.contrib.auth.middleware.AuthenticationMiddleware"
    ours = "threadline.django.ThreadlineMiddleware"
    apps = ["django.contrib.auth", "django.contrib.contenttypes", "threadline", "tests.djangoproject.shop"]
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[auth, ours]) == []
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[ours, auth]) == ["threadline.E001"]
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[auth]) == ["threadline.W001"]
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[ours]) == ["threadline.W002"]
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[auth, ours], THREADLINE={"ORM_BRIDGE": False}) == [
        "threadline.W003"
    ]
    # a project's subclass of the middleware is the middleware
    subclass = "tests.djangoproject.auth.ProjectThreadlineMiddleware"
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[auth, subclass]) == []
    assert _ids(INSTALLED_APPS=apps, MIDDLEWARE=[subclass, auth]) == ["threadline.E001"]


def test_the_database_check_names_capture_that_is_not_installed(mig_dsn: str) -> None:
    from django.core.checks import Tags, run_checks

    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE shop_purchase DISABLE TRIGGER threadline_capture_update")
    try:
        found = [m for m in run_checks(tags=[Tags.database], databases=[ALIAS]) if m.id == "threadline.W010"]
        assert len(found) == 1
        assert "capture of public.shop_purchase is disabled" in found[0].msg
        assert "ENABLE TRIGGER" in (found[0].hint or "")
    finally:
        with psycopg.connect(mig_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE shop_purchase ENABLE TRIGGER threadline_capture_update")
    assert [m for m in run_checks(tags=[Tags.database], databases=[ALIAS]) if m.id == "threadline.W010"] == []


def test_the_database_check_names_a_schema_written_by_another_build(mig_dsn: str) -> None:
    from django.core.checks import Tags, run_checks

    from threadline import ddl

    def found() -> list[Any]:
        return [m for m in run_checks(tags=[Tags.database], databases=[ALIAS]) if m.id == "threadline.W011"]

    assert found() == []
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        conn.execute("COMMENT ON TABLE threadline.schema_version IS 'threadline audit schema 7, script 0000'")
        (warning,) = found()
        assert "another build" in warning.msg
        assert warning.hint == f"run: manage.py threadline install --database {ALIAS}"
        assert ddl.install(conn).refreshed
    assert found() == []


def test_the_middleware_refuses_to_start_without_the_app(mig_dsn: str) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from threadline.django import ThreadlineMiddleware

    with (
        override_settings(INSTALLED_APPS=["tests.djangoproject.shop"]),
        pytest.raises(ImproperlyConfigured, match="needs 'threadline' in INSTALLED_APPS"),
    ):
        ThreadlineMiddleware(lambda request: None)
    assert ThreadlineMiddleware(lambda request: None) is not None


def test_login_and_drf_authentication_attribute_the_rest_of_the_request(mig_dsn: str) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client, override_settings
    from rest_framework.authtoken.models import Token

    import threadline

    migrate()  # every app: auth, contenttypes, authtoken, shop
    user = get_user_model().objects.create_user("ann")
    token = Token.objects.create(user=user)
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        threadline.ddl.track(conn, "auth_user")
    with override_settings(**LOGIN_SETTINGS):
        login = Client().post("/login/", {"username": "ann"})
        api = Client().post("/api/purchases/", HTTP_AUTHORIZATION=f"Token {token.key}")
        plain = Client().post("/api/plain-purchases/", HTTP_AUTHORIZATION=f"Token {token.key}")
    me = {"type": "user", "id": str(user.pk)}
    assert login.json()["ctx"]["actor"] == me and api.json()["ctx"]["actor"] == me
    assert plain.json()["ctx"]["actor"] == {"type": "anonymous"}  # without the mixin
    with psycopg.connect(mig_dsn) as conn:
        rows = conn.execute(
            "SELECT c.table_name, "
            + changed_fields_sql(sql.Identifier("threadline")).as_string(conn)
            + ", c.pk, t.actor, t.correlation_id FROM threadline.changes c"
            " JOIN threadline.transactions t ON t.id = c.transaction_id"
            " WHERE c.table_name IN ('auth_user', 'shop_purchase') AND c.op <> 'insert' OR t.correlation_id = ANY (%s)",
            [[login["X-Correlation-ID"], api["X-Correlation-ID"], plain["X-Correlation-ID"]]],
        ).fetchall()
    by_request = {r[4]: r for r in rows}
    assert by_request[login["X-Correlation-ID"]][:2] == ("auth_user", ["last_login"])
    assert by_request[login["X-Correlation-ID"]][3] == me  # the login request's own write
    assert by_request[api["X-Correlation-ID"]][3] == me
    assert by_request[plain["X-Correlation-ID"]][3] == {"type": "anonymous"}


def test_the_logout_request_stays_the_users_who_asked_for_it(mig_dsn: str) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client, override_settings

    migrate()
    user = get_user_model().objects.create_user("cid")
    with override_settings(**LOGIN_SETTINGS):
        client = Client()
        client.force_login(user)
        out = client.post("/logout/")
        after = client.post("/logout/")  # the session is gone: this one is anonymous
    me = {"type": "user", "id": str(user.pk)}
    assert out.json()["ctx"]["actor"] == me and after.json()["ctx"]["actor"] == {"type": "anonymous"}
    with psycopg.connect(mig_dsn) as conn:
        actors = conn.execute(
            "SELECT c.after->>'id', t.actor FROM threadline.changes c"
            " JOIN threadline.transactions t ON t.id = c.transaction_id"
            " WHERE c.table_name = 'shop_purchase' AND c.after->>'name' = 'logout' ORDER BY c.id"
        ).fetchall()
    assert actors == [(str(out.json()["id"]), me), (str(after.json()["id"]), {"type": "anonymous"})]


def test_an_async_login_attributes_the_rest_of_the_request(mig_dsn: str) -> None:
    import asyncio

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import AsyncClient, Client, override_settings

    import threadline

    user = get_user_model().objects.create_user("bea")
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        threadline.ddl.track(conn, "auth_user")
    with override_settings(**LOGIN_SETTINGS):
        # an async view awaiting alogin, and the sync view's login() served by the async handler
        logins = [
            asyncio.run(AsyncClient().post(url, {"username": "bea"})) for url in ("/alogin/", "/login/")
        ]
    me = {"type": "user", "id": str(user.pk)}
    assert [r.status_code for r in logins] == [200, 200]
    assert [r.json()["ctx"]["actor"] for r in logins] == [me, me]  # threadline.current() in the view
    with psycopg.connect(mig_dsn) as conn:
        rows = conn.execute(
            "SELECT c.table_name, c.op, t.actor FROM threadline.changes c"
            " JOIN threadline.transactions t ON t.id = c.transaction_id"
            " WHERE t.correlation_id = %s ORDER BY c.id",
            [logins[0]["X-Correlation-ID"]],
        ).fetchall()
    # the last_login update, then the view's own write after alogin
    assert rows == [("auth_user", "update", me), ("shop_purchase", "insert", me)]
    # login() with a resolver that queries the database (which it cannot do in an event loop)
    resolver = {**settings.THREADLINE, "ACTOR_RESOLVER": "tests.djangoproject.auth.username_actor"}
    with override_settings(**LOGIN_SETTINGS, THREADLINE=resolver):
        login = Client().post("/login/", {"username": "bea"})
    assert login.json()["ctx"]["actor"] == {"type": "user", "id": "bea"}


def test_declarative_tracking_is_applied_after_every_migrate(mig_dsn: str) -> None:
    from django.conf import settings
    from django.test import override_settings

    import threadline

    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        threadline.ddl.untrack(conn, "shop_purchase")
    migrate()  # nothing to migrate: the post_migrate handler tracks the model again
    with psycopg.connect(mig_dsn) as conn:
        (entry,) = [t for t in threadline.ddl.tracked_tables(conn) if t.table_name == "shop_purchase"]
    assert entry.status == "installed" and entry.mask == ("card",) and entry.exclude == ()
    declared = {
        **settings.THREADLINE,
        "TRACK": {"shop.Purchase": {"mask": ["card_number"], "exclude": ["name"]}},
    }
    with override_settings(THREADLINE=declared):
        migrate()
    with psycopg.connect(mig_dsn) as conn:
        (entry,) = [t for t in threadline.ddl.tracked_tables(conn) if t.table_name == "shop_purchase"]
    assert entry.mask == ("card",) and entry.exclude == ("name",)  # field names, resolved to columns
    # back to the declaration without the exclude: it is kept (revealing takes --include)
    migrate()
    with psycopg.connect(mig_dsn) as conn:
        (entry,) = [t for t in threadline.ddl.tracked_tables(conn) if t.table_name == "shop_purchase"]
    assert entry.exclude == ("name",)
    with (
        override_settings(THREADLINE={**settings.THREADLINE, "TRACK": {"shop.Nope": {}}}),
        pytest.raises(Exception, match=r"'shop\.Nope', which is not an installed model"),
    ):
        migrate()


def test_the_migrations_match_the_models(database: str, mig_dsn: str) -> None:
    env = {**os.environ, DSN_ENV: database, "DJANGO_SETTINGS_MODULE": "tests.djangoproject.admin_settings"}
    res = subprocess.run(
        [sys.executable, "-m", "django", "makemigrations", "--check", "--dry-run", "threadline", "shop"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0 and "No changes detected" in res.stdout, res.stdout + res.stderr


def test_with_psycopg2_installed_django_still_runs_on_psycopg_3(mig_dsn: str) -> None:
    pytest.importorskip("psycopg2")  # the Django 4.2 run of the suite installs it (see Makefile)
    from django.db import connections
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    assert is_psycopg3
    connections[ALIAS].ensure_connection()
    assert isinstance(connections[ALIAS].connection, psycopg.Connection)


def test_the_driver_checks(mig_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import connections
    from django.db.backends.postgresql import psycopg_any

    from threadline.django.checks import check_setup

    connections.settings["legacy"] = {
        **connections.settings[ALIAS],
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": ":memory:",
    }
    try:
        found = {m.id: m.msg for m in check_setup()}
        assert "database 'legacy' is sqlite" in found["threadline.W004"]
    finally:
        del connections.settings["legacy"]
    monkeypatch.setattr(psycopg_any, "is_psycopg3", False)  # as Django before psycopg 3 support
    found = {m.id: m.msg for m in check_setup()}
    assert "runs on psycopg2" in found["threadline.E002"]


def test_take_baseline_operation(mig_dsn: str) -> None:
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    from threadline.core.errors import ConfigurationError
    from threadline.django.operations import TakeBaseline

    migrate()
    connection = connections[ALIAS]
    state = MigrationExecutor(connection).loader.project_state()
    table = state.apps.get_model("shop", "Purchase")._meta.db_table
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        conn.execute("SELECT threadline.untrack(%s::regclass)", [table])
        conn.execute(
            sql.SQL("INSERT INTO {} (name, card) SELECT 'b', 'c' FROM generate_series(1, 5)").format(
                sql.Identifier(table)
            )
        )
        conn.execute("SELECT threadline.track(%s::regclass, mask => ARRAY['card'])", [table])
        expected = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    operation = TakeBaseline("shop.Purchase", batch_size=2)
    assert operation.deconstruct() == (
        "TakeBaseline",
        ["shop.Purchase"],
        {"batch_size": 2},
    )
    with (
        connection.schema_editor(atomic=True) as editor,
        pytest.raises(ConfigurationError, match="atomic = False"),
    ):
        operation.database_forwards("shop", editor, state, state)
    with connection.schema_editor(atomic=False) as editor:
        operation.database_forwards("shop", editor, state, state)
    with psycopg.connect(mig_dsn) as conn:
        done = conn.execute(
            "SELECT b.rows_done, b.finished_at IS NOT NULL,"
            " (SELECT count(*) FROM threadline.changes c WHERE c.transaction_id = b.transaction_id AND c.op = 'snapshot'),"
            " (SELECT count(*) FROM threadline.changes c WHERE c.transaction_id = b.transaction_id AND c.after ->> 'card' <> '[masked]')"
            "  FROM threadline.baselines b WHERE b.table_name = %s AND b.ended_at IS NULL",
            [table],
        ).fetchone()
    assert expected is not None and done == (expected[0], True, expected[0], 0)


def test_a_squashed_migration_keeps_its_track_operation(
    mig_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management import call_command
    from django.test import override_settings

    from threadline.django.operations import Track

    migrate("shop")  # the audit schema and shop's migrations, whatever ran before
    package = tmp_path / "squashed_shop_migrations"
    shutil.copytree(Path(__file__).parent / "djangoproject" / "shop" / "migrations", package)
    monkeypatch.syspath_prepend(str(tmp_path))
    with override_settings(MIGRATION_MODULES={"shop": package.name}):
        call_command("squashmigrations", "shop", "0002", interactive=False, verbosity=0)
        (written,) = package.glob("0001_squashed_0002_*.py")
        assert "threadline.django.operations.Track(" in written.read_text()
        module = importlib.import_module(f"{package.name}.{written.stem}")
        (track,) = [op for op in module.Migration.operations if isinstance(op, Track)]
        assert (track.model, track.mask) == ("shop.Order", ("card_number",))
        migrate("shop", "zero")
        assert ("shop_purchase", "installed") not in _status(mig_dsn)
        out = migrate("shop")
    assert f"Applying shop.{written.stem}... OK" in out
    with psycopg.connect(mig_dsn) as conn:
        (entry,) = [t for t in threadline.ddl.tracked_tables(conn) if t.table_name == "shop_purchase"]
    assert entry.status == "installed" and entry.mask == ("card",)


class KeepTheAuditSchemaOut:
    """A router that keeps threadline's migrations out of the ``other`` database."""

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if (db, app_label) == ("other", "threadline") else None


def test_migrations_follow_the_database_routers(database: str, mig_dsn: str) -> None:
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections
    from django.test import override_settings

    name = f"{connections.settings[ALIAS]['NAME']}_other"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    connections.settings["other"] = {**connections.settings[ALIAS], "NAME": name}
    other = psycopg.conninfo.make_conninfo(database, dbname=name)

    def tables() -> list[str]:
        with psycopg.connect(other) as conn:
            rows = conn.execute(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables"
                " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows if r[0] == "threadline.changes" or r[0].startswith("public.shop")]

    def migrate_other(*args: str) -> None:
        call_command("migrate", *args, database="other", stdout=io.StringIO(), verbosity=1)

    try:
        # the shop's models live in the migrations database: its Track and Untrack are skipped here
        routers = [f"{__name__}.KeepTheAuditSchemaOut", *settings.DATABASE_ROUTERS]
        with override_settings(DATABASE_ROUTERS=routers):
            migrate_other()
            assert tables() == []  # and no audit schema where the routers keep threadline out
            migrate_other("threadline", "zero")
        migrate_other()
        assert tables() == ["threadline.changes"]
        migrate_other("shop", "zero")
        migrate_other("shop")
        assert tables() == ["threadline.changes"]
    finally:
        connections["other"].close()
        del connections.settings["other"]
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_declarative_tracking_skips_what_the_migrated_state_lacks(
    mig_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django.conf import settings
    from django.test import override_settings

    from threadline.core.errors import ConfigurationError

    def entry(table: str) -> Any:
        with psycopg.connect(mig_dsn) as conn:
            found = [t for t in threadline.ddl.tracked_tables(conn) if t.table_name == table]
        return found[0] if found else None

    before = entry("shop_purchase")
    with psycopg.connect(mig_dsn, autocommit=True) as conn:
        threadline.ddl.untrack(conn, "auth_user")
    track = {
        "blog.Shop": {"mask": ["address"]},  # a parent's field: its column is in the parent's table
        "shop.Nope": {},
        "shop.Purchase": {"mask": ["card_number", "note"]},  # no column "note" at this state
        "auth.User": {"mask": ["password"]},
    }
    with (
        override_settings(THREADLINE={**settings.THREADLINE, "TRACK": track}),
        pytest.raises(ConfigurationError) as failed,
    ):
        migrate()
    message = str(failed.value)
    assert "'shop.Nope', which is not an installed model" in message
    assert "names address, inherited from blog.Place" in message and "track 'blog.Place'" in message
    # the bad entries stopped nothing: the last one is applied
    assert entry("auth_user").status == "installed" and entry("auth_user").mask == ("password",)
    # the entry naming a missing column is skipped whole, its table's tracking left as it was
    assert entry("shop_purchase") == before and before.mask == ("card",)
    assert "shop.Purchase: table shop_purchase in database 'migrations' has no column note" in caplog.text


def test_the_check_names_a_parents_field_in_a_childs_entry(mig_dsn: str) -> None:
    from django.conf import settings

    def track(entries: dict[str, Any]) -> list[str]:
        return _ids(THREADLINE={**settings.THREADLINE, "TRACK": entries})

    assert "threadline.E003" in track({"blog.Shop": {"mask": ["address"]}})
    assert "threadline.E003" not in track(
        {"blog.Shop": {"exclude": ["owner"]}, "blog.Place": {"mask": ["address"]}}
    )


def test_call_command_runs_the_command_line_into_its_streams(mig_dsn: str) -> None:
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    call_command("threadline", "coverage", "--expect", "shop_purchase", "--database", ALIAS, stdout=out)
    assert out.getvalue() == _cli("coverage", "--expect", "shop_purchase", "--dsn", mig_dsn).stdout
    assert "shop_purchase" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="exited with status 1"):
        call_command(
            "threadline", "coverage", "--expect", "shop_nothing", database=ALIAS, stdout=out, stderr=err
        )
    direct = _cli("coverage", "--expect", "shop_nothing", "--dsn", mig_dsn)
    assert (out.getvalue(), err.getvalue()) == (direct.stdout, direct.stderr)


def test_the_audit_schema_setting_is_the_schema_every_part_uses(
    database: str, mig_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django.conf import settings
    from django.core.checks import Tags, run_checks
    from django.core.management import call_command
    from django.db import connections
    from django.test import override_settings

    migrate()  # the migrations database: the default audit schema
    name = f"{connections.settings[ALIAS]['NAME']}_schema"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    connections.settings["schema"] = {**connections.settings[ALIAS], "NAME": name}
    custom = {**settings.THREADLINE, "AUDIT_SCHEMA": "audit"}
    try:
        with override_settings(THREADLINE=custom):
            call_command("migrate", database="schema", stdout=io.StringIO(), verbosity=0)
            # the command line works in it too
            call_command(
                "threadline", "track", "public.django_migrations", database="schema", stdout=io.StringIO()
            )
            with psycopg.connect(psycopg.conninfo.make_conninfo(database, dbname=name)) as conn:
                schemas = conn.execute(
                    "SELECT nspname FROM pg_namespace WHERE nspname IN ('audit', 'threadline')"
                ).fetchall()
                assert schemas == [("audit",)]
                tracked = {t.table_name for t in threadline.ddl.tracked_tables(conn, "audit")}
                assert tracked == {"django_migrations"}, tracked
            # the migrations database holds the default schema: the check says which is which,
            # and TRACK, which would apply to the setting's schema, says it is not applied
            messages = [
                m for m in run_checks(tags=[Tags.database], databases=[ALIAS]) if m.id == "threadline.E004"
            ]
            assert len(messages) == 1 and "'audit'" in messages[0].msg, messages
            caplog.set_level("WARNING", logger="threadline")
            migrate("shop")
            assert "THREADLINE['TRACK'] is not applied in database 'migrations'" in caplog.text
    finally:
        connections["schema"].close()
        del connections.settings["schema"]
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
