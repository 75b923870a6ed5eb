"""The admin pages in a real browser: headless Chromium (Debian's ``chromium``) against
``manage.py runserver`` with the test project's admin settings, logged in as a staff user; and
the pages a browser would not ask for, with Django's test client in ``manage.py shell``.

The browser tests are skipped only when no Chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "tests.djangoproject.admin_settings"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium")

SETUP = """
import threadline
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from tests.djangoproject.shop.models import Purchase

User = get_user_model()
auditor = User.objects.create_user("auditor", is_staff=True)
auditor.user_permissions.add(
    Permission.objects.get(codename="view_audit_trail"), Permission.objects.get(codename="view_purchase")
)
clerk = User.objects.create_user("clerk", is_staff=True)
clerk.user_permissions.add(Permission.objects.get(codename="view_purchase"))
with threadline.context(actor="user:42", correlation_id="req-admin-1", request_id="r-1", origin="web"):
    p = Purchase.objects.create(name="mug", card_number="4111111111111111")
job = {"name": "shop.tasks.charge", "id": "task-1", "retries": 0, "root_id": "task-1"}
with threadline.context(actor="user:42", correlation_id="req-admin-1", causation_id="r-1", origin="celery", job=job):
    Purchase.objects.filter(pk=p.pk).update(name="big mug")
# the same story also changes a user (a model the auditor may not view) and a table no model maps
from django.db import connection
from threadline.django.database import dsn_for
import psycopg
with connection.cursor() as cursor:
    cursor.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
with psycopg.connect(dsn_for("default"), autocommit=True) as conn:
    threadline.ddl.track(conn, "auth_user", exclude=["password"])
    threadline.ddl.track(conn, "ledger")
User.objects.create_superuser("boss")
with threadline.context(actor="user:42", correlation_id="req-admin-1", request_id="r-1", origin="web"):
    User.objects.filter(username="clerk").update(first_name="Clara")
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO ledger VALUES (1, 'note')")
print(p.pk)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(database: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")},
        "THREADLINE_TEST_CELERY_DSN": database,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "PYTHONPATH": str(ROOT),
    }


def _django(database: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "django", *args],
        capture_output=True,
        text=True,
        env=_env(database),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def project(database: str) -> Iterator[tuple[str, int]]:
    """A migrated database with two staff users and a purchase's story: the session database's
    DSN (the settings derive the project's database from it) and the purchase's pk."""
    name = psycopg.conninfo.conninfo_to_dict(database)["dbname"] + "_mig"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        _django(database, "migrate", "--verbosity", "0")
        pk = int(_django(database, "shell", "-c", SETUP).strip().splitlines()[-1])
        yield database, pk
    finally:
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def server(project: tuple[str, int]) -> Iterator[tuple[str, int]]:
    """``runserver`` on the project's database."""
    database, pk = project
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload"],
        env=_env(database),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", pk
    finally:
        proc.terminate()
        proc.wait(timeout=10)


CLIENT = """
import json, os
from django.contrib.auth import get_user_model
from django.test import Client

client = Client(raise_request_exception=False)
client.force_login(get_user_model().objects.get(username=os.environ["ADMIN_TEST_USER"]))
pages = {}
for url in json.loads(os.environ["ADMIN_TEST_URLS"]):
    response = client.get(url)
    pages[url] = [response.status_code, response.get("Location", ""), response.content.decode()]
print(json.dumps(pages))
"""


def client_get(database: str, user: str, *urls: str, routed: bool = False) -> dict[str, tuple[int, str, str]]:
    """Each URL's status, redirect and body, fetched with Django's test client as ``user``
    (exceptions are answered as the server would: 500); ``routed``: with the database router
    that reads the shop's models through another alias."""
    env = {**_env(database), "ADMIN_TEST_USER": user, "ADMIN_TEST_URLS": json.dumps(urls)}
    if routed:
        env["ADMIN_TEST_ROUTED"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "django", "shell", "-c", CLIENT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    pages = json.loads(res.stdout.strip().splitlines()[-1])
    return {url: (status, location, body) for url, (status, location, body) in pages.items()}


def browse(base: str, user: str, page: str, screenshot: Path | None = None) -> str:
    """The DOM of ``page`` in headless Chromium, logged in as ``user`` (and a screenshot)."""
    url = f"{base}/test-login/{user}/?next={page}"
    args = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    if screenshot is not None:
        res = subprocess.run(
            [*args, "--window-size=1400,800", f"--screenshot={screenshot}", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert screenshot.exists() and screenshot.stat().st_size > 10_000, res.stderr
    res = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@browser
def test_an_objects_audit_trail_from_its_change_page(server: tuple[str, int], tmp_path: Path) -> None:
    base, pk = server
    change = browse(base, "auditor", f"/admin/shop/purchase/{pk}/change/")
    assert f'href="/admin/shop/purchase/{pk}/audit-trail/"' in change and "threadline-audit-trail" in change
    shot = tmp_path / "audit-trail.png"
    page = browse(base, "auditor", f"/admin/shop/purchase/{pk}/audit-trail/", screenshot=shot)
    # the admin lists the newest change only (threadline_history_limit = 1) and says so
    assert page.count('class="threadline-change threadline-') == 1 and "threadline-update" in page
    assert f"manage.py threadline history shop_purchase {pk}" in page
    assert "user:42" in page and "shop.tasks.charge" in page and "celery" in page
    assert "big mug" in page
    assert "4111111111111111" not in page  # masked as captured
    assert 'href="/admin/threadline/audittrail/trace/req-admin-1/"' in page
    if os.environ.get("THREADLINE_KEEP_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["THREADLINE_KEEP_SCREENSHOTS"]) / "admin-audit-trail.png")


@browser
def test_a_requests_trace_in_the_admin(server: tuple[str, int], tmp_path: Path) -> None:
    base, _ = server
    index = browse(base, "auditor", "/admin/")
    assert "/admin/threadline/audittrail/" in index
    shot = tmp_path / "trace.png"
    page = browse(base, "auditor", "/admin/threadline/audittrail/trace/req-admin-1/", screenshot=shot)
    assert "threadline-request" in page and "task shop.tasks.charge" in page
    assert page.count('class="threadline-transaction"') == 2
    search = browse(base, "auditor", "/admin/threadline/audittrail/?correlation_id=req-admin-1")
    assert "task shop.tasks.charge" in search  # the search redirects to the trace
    assert "Nothing was recorded" in browse(base, "auditor", "/admin/threadline/audittrail/trace/nope/")
    if os.environ.get("THREADLINE_KEEP_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["THREADLINE_KEEP_SCREENSHOTS"]) / "admin-trace.png")


@browser
def test_without_the_permission_the_pages_are_refused(server: tuple[str, int]) -> None:
    base, pk = server
    page = browse(base, "clerk", f"/admin/shop/purchase/{pk}/audit-trail/")
    assert "403 Forbidden" in page and "big mug" not in page
    assert "403 Forbidden" in browse(base, "clerk", "/admin/threadline/audittrail/trace/req-admin-1/")
    assert "/admin/threadline/audittrail/" not in browse(base, "clerk", "/admin/")


def test_the_audit_trail_has_no_object_pages_and_refuses_bad_ids(project: tuple[str, int]) -> None:
    database, _ = project
    base = "/admin/threadline/audittrail/"
    objects = [f"{base}1/change/", f"{base}1/delete/", f"{base}1/history/", f"{base}add/"]
    bad = [f"{base}trace/a%00b/", f"{base}trace/%E2%80%AEabc/", f"{base}trace/{'x' * 300}/"]
    search = f"{base}?correlation_id=a%0Ab"
    pages = client_get(database, "auditor", *objects, *bad, search, f"{base}trace/req-admin-1/")
    for url in objects:
        assert pages[url][0] == 404, url  # the model has no table: no object pages
    for url in [*bad, search]:
        status, _, body = pages[url]
        assert status == 400 and "No trace: correlation_id " in body, url
    assert "correlation_id is 300 characters long; the limit is " in pages[bad[2]][2]
    assert pages[f"{base}trace/req-admin-1/"][0] == 200


def test_a_trace_shows_only_the_tables_the_user_may_view(project: tuple[str, int]) -> None:
    database, _ = project
    url = "/admin/threadline/audittrail/trace/req-admin-1/"
    pages = {user: client_get(database, user, url)[url] for user in ("auditor", "boss")}
    (status, _, auditor), (_, _, boss) = pages["auditor"], pages["boss"]
    # the auditor may view purchases only: the user's change and the model-less table are left out
    assert status == 200 and auditor.count('class="threadline-transaction"') == 2
    assert "shop_purchase" in auditor and "auth_user" not in auditor and "first_name" not in auditor
    assert "ledger" not in auditor
    assert "Not shown: 2 changes of tables whose model you may not view" in auditor
    assert boss.count('class="threadline-transaction"') == 4 and "Not shown" not in boss
    assert "auth_user" in boss and "first_name" in boss and "ledger" in boss


def test_the_history_links_to_the_trace_in_the_objects_database(project: tuple[str, int]) -> None:
    database, pk = project
    url = f"/admin/shop/purchase/{pk}/audit-trail/"
    plain = client_get(database, "auditor", url)[url][2]
    routed = client_get(database, "auditor", url, routed=True)[url][2]
    assert 'href="/admin/threadline/audittrail/trace/req-admin-1/"' in plain
    assert 'href="/admin/threadline/audittrail/trace/req-admin-1/?database=migrations"' in routed
