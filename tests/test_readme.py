"""The README's quick starts run as written (doc drift fails the suite).

The plain-psycopg quick start is executed block by block against this session's database; the
Django + Celery snippet is checked against the tested Django project and the real API.
``make demo`` and ``make test`` themselves are run by ``.ci/run``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _reset(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.orders")
        conn.execute("TRUNCATE threadline.changes, threadline.transactions")


@pytest.fixture
def readme_env(database: str) -> Iterator[dict[str, str]]:
    _reset(database)  # the session database is shared with other tests
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    if shutil.which("psql", path=path) is None:  # a machine without PostgreSQL: pgserver's psql
        import pgserver

        path = os.pathsep.join([str(Path(pgserver.__file__).parent / "pginstall" / "bin"), path])
    yield {**os.environ, "THREADLINE_DSN": database, "PATH": path}
    _reset(database)


def _bash(script: str, env: dict[str, str]) -> str:
    script = "\n".join(line for line in script.splitlines() if not line.startswith("export THREADLINE_DSN="))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_plain_psycopg_quick_start_runs_as_written(readme_env: dict[str, str]) -> None:
    section = _section("Quick start: plain psycopg")
    setup, cli_timeline = _blocks(section, "bash")
    (program,) = _blocks(section, "python")
    assert "export THREADLINE_DSN=" in setup  # the reader sets it; the test points it at its database

    _bash(setup, readme_env)
    _bash(setup, readme_env)  # every step may be run again
    done = subprocess.run([sys.executable, "-c", program], env=readme_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "insert orders {'id': 7} None user:42 req-1",
        "update orders {'id': 7} ('status',) user:42 req-1",
    ]
    with psycopg.connect(readme_env["THREADLINE_DSN"]) as conn:
        row = conn.execute(
            "SELECT t.actor, t.origin, c.after->>'card_number' FROM threadline.changes c "
            "JOIN threadline.transactions t ON t.id = c.transaction_id WHERE c.op = 'insert'"
        ).fetchone()
    assert row == ({"type": "user", "id": "42"}, "web", "[masked]")
    rows = [line.split() for line in _bash(cli_timeline, readme_env).splitlines()[1:]]
    assert [(r[2], r[3], r[5], r[7]) for r in rows] == [
        ("insert", "public.orders", "user:42", "req-1"),
        ("update", "public.orders", "user:42", "req-1"),
    ]


def test_django_and_celery_quick_start_matches_the_tested_project() -> None:
    snippet = _blocks(_section("Quick start: Django + Celery"), "python")[0]
    settings = (ROOT / "tests" / "djangoproject" / "settings.py").read_text()
    for name in ('"threadline"', '"threadline.django.ThreadlineMiddleware"'):
        assert name in snippet and name in settings

    from celery import Celery

    import threadline
    from threadline import ActorRef

    app = Celery("readme", set_as_current=False)
    threadline.celery.install(app, default_actor=ActorRef.system("celery"))
    try:

        @threadline.task(bind=True, max_retries=3, app=app)
        def charge(self: object, order_id: int) -> int:
            return order_id

        assert charge.max_retries == 3 and charge.run(5) == 5
    finally:
        threadline.celery.uninstall(app)


GETTING_STARTED = (ROOT / "docs" / "getting-started.md").read_text()


def test_getting_started_runs_the_tested_quick_start() -> None:
    """Its psycopg path is the README's quick start, block for block (run above); its Celery
    block runs as written."""
    page = re.search(r"^## Path 1: plain psycopg\n(.*?)(?=^## )", GETTING_STARTED, re.S | re.M)
    assert page
    readme = _section("Quick start: plain psycopg")
    assert _blocks(page.group(1), "bash") == _blocks(readme, "bash")
    assert _blocks(page.group(1), "python") == _blocks(readme, "python")
    celery_part = re.search(r"^## Celery without Django\n(.*)", GETTING_STARTED, re.S | re.M)
    assert celery_part
    (program,) = _blocks(celery_part.group(1), "python")
    check = program + "\nassert threadline.celery.installed(app) and mark_paid.name.endswith('mark_paid')\n"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
