"""The ``threadline`` console script, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg

from threadline import ddl
from threadline.ops.partitions import is_partitioned

from .conftest import changes


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "threadline.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def test_version_and_help_with_examples() -> None:
    assert run("--version").stdout.startswith("threadline, version ")
    out = run("--help").stdout
    assert "Examples:" in out and "threadline track" in out
    assert "--print-sql" in run("install", "--help").stdout
    module = subprocess.run([sys.executable, "-m", "threadline", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "Usage: python -m threadline" in module.stdout


def test_print_sql_needs_no_database_and_is_idempotent(conn: psycopg.Connection[Any]) -> None:
    res = run("install", "--print-sql", "--audit-schema", "audit_cli")
    assert res.returncode == 0 and 'CREATE SCHEMA IF NOT EXISTS "audit_cli"' in res.stdout
    try:
        conn.execute(res.stdout.encode())
        conn.execute(res.stdout.encode())  # applying the printed script twice is harmless
        assert conn.execute("SELECT version FROM audit_cli.schema_version").fetchall() == [
            (ddl.SCHEMA_VERSION,)
        ]
    finally:
        conn.execute("DROP SCHEMA audit_cli CASCADE")


def test_install_says_when_it_refreshes_a_store_of_another_build(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute(ddl.install_sql("audit_cli2").encode())
    try:
        conn.execute("COMMENT ON TABLE audit_cli2.schema_version IS 'threadline audit schema 7, script 0000'")
        res = run("install", "--dsn", dsn, "--audit-schema", "audit_cli2")
        assert res.returncode == 0, res.stderr
        assert "brought schema audit_cli2 up to date with this release" in res.stdout
        res = run("install", "--dsn", dsn, "--audit-schema", "audit_cli2")
        assert res.returncode == 0 and "is up to date" in res.stdout
    finally:
        conn.execute("DROP SCHEMA audit_cli2 CASCADE")


def test_install_track_untrack_round_trip(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.orders (id int PRIMARY KEY, card text, note text)")
    res = run("install", "--dsn", dsn)
    assert res.returncode == 0 and "up to date" in res.stdout
    res = run("track", "app.orders", "--mask", "card", "--exclude", "note", env={"THREADLINE_DSN": dsn})
    assert res.returncode == 0, res.stderr
    assert "tracking app.orders (typed capture)\n  keys: id\n  exclude: note\n  mask: card\n" in res.stdout
    sql_text = run("track", "app.orders", "--mask", "card", "--exclude", "note", "--print-sql").stdout
    assert sql_text == (
        """SELECT * FROM "threadline".track('"app"."orders"', exclude => ARRAY['note']::text[], """
        """mask => ARRAY['card']::text[]);\n"""
    )
    assert conn.execute(sql_text).fetchone()[2] == "unchanged"  # type: ignore[index]
    # again without options: the stored ones are kept, and the output says so
    res = run("track", "app.orders", "--dsn", dsn)
    assert "capture is current on app.orders" in res.stdout and "mask: card" in res.stdout
    conn.execute("INSERT INTO app.orders VALUES (1, '4111', 'n')")
    assert changes(conn)[0]["after"] == {"id": 1, "card": "[masked]"}
    res = run("untrack", "app.orders", env={"DATABASE_URL": dsn})
    assert res.returncode == 0 and "stopped tracking" in res.stdout
    assert "was not tracked" in run("untrack", "app.orders", "--dsn", dsn).stdout


def test_bad_arguments_exit_2_with_one_line(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.nokey (a int)")
    for args in (
        ("install",),  # no DSN anywhere
        ("track", "app.missing", "--dsn", dsn),
        ("track", "app.nokey", "--dsn", dsn),
        ("install", "--audit-schema", "Bad Name", "--dsn", dsn),
        ("track", "--dsn", dsn),
        ("frobnicate",),
        ("erase", "--subject", "nocolon", "--reason", "x", "--dsn", dsn),
    ):
        res = run(*args)
        assert res.returncode == 2, (args, res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.stderr)


def test_database_errors_exit_1_with_message_and_hint() -> None:
    res = run("install", "--dsn", "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    assert res.returncode == 1
    assert res.stderr.startswith("Error: ") and "Hint: " in res.stderr


def test_errors_say_what_to_do(dsn: str) -> None:
    bad = run("timeline", "--dsn", "not a dsn")
    assert bad.returncode == 1 and "Hint: give a PostgreSQL connection string" in bad.stderr
    for args in (
        ("seal",),
        ("verify",),
        ("partitions", "--create"),
        ("erase", "--subject", "user:1", "--reason", "x"),
    ):
        res = run(*args, "--audit-schema", "not_installed_here", "--dsn", dsn)
        assert res.returncode == 1, (args, res)
        assert "run `threadline install`" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    ok = run("verify", "--dsn", dsn)
    assert ok.returncode == 0 and "head None" not in ok.stdout
    with psycopg.connect(dsn) as conn:  # the other layout than the store's
        other = "none" if is_partitioned(conn) else "month"
    note = run("install", "--partition-by", other, "--dsn", dsn)
    assert note.returncode == 0 and "applies to a new install only" in note.stderr


def test_import_threadline_does_not_import_celery() -> None:
    code = (
        "import sys, threadline\n"
        "assert 'celery' not in sys.modules, 'celery imported'\n"
        "assert callable(threadline.task) and threadline.celery.install\n"
        "assert 'celery' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_each_command_shows_its_own_examples_and_errors_point_at_its_help() -> None:
    from threadline.cli.help import COMMAND_EXAMPLES

    for name, lines in COMMAND_EXAMPLES.items():
        out = run(name, "--help").stdout
        assert all(line in out for line in lines), name
        others = [line for other, ls in COMMAND_EXAMPLES.items() if other != name for line in ls]
        assert not any(line in out for line in others), name
    bad = run("timeline", "--since", "yesterday-ish", "--dsn", "postgresql://nowhere")
    assert bad.returncode == 2 and bad.stderr.rstrip().endswith("(see 'threadline timeline --help')")
