"""docs/django.md, followed as written in a fresh ``django-admin startproject``: its settings and
files pasted in, then ``makemigrations``, ``migrate``, ``manage.py threadline coverage``, the
system checks, a logged-in request through the middleware, and the admin's audit trail page.

Each Python block of the guide that names a file (``In `shop/settings.py`:`` before it, or a
``# path.py`` first line) is written there; settings blocks are appended to the generated
``settings.py``, as a reader pastes them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "django.md").read_text()


def guide_files() -> list[tuple[str, str]]:
    """(path, code) for each Python block of the guide that names its file, in order."""
    out = []
    for match in re.finditer(r"(?:^(?P<lead>[^\n]*)\n\n)?```python\n(?P<code>.*?)```", GUIDE, re.S | re.M):
        code = match.group("code")
        named = re.search(r"`([\w/]+\.py)`", match.group("lead") or "")
        first = re.match(r"# ([\w/]+\.py)\n", code)
        if first:
            out.append((first.group(1), code[first.end() :]))
        elif named:
            out.append((named.group(1), code))
    return out


@pytest.fixture(scope="module")
def project(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    name = psycopg.conninfo.conninfo_to_dict(database)["dbname"] + "_guide"
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    home = tmp_path_factory.mktemp("guide")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "THREADLINE_"))}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    subprocess.run([f"{bindir}/django-admin", "startproject", "shop"], cwd=home, check=True, env=env)
    root = home / "shop"
    subprocess.run([sys.executable, "manage.py", "startapp", "orders"], cwd=root, check=True, env=env)
    info = psycopg.conninfo.conninfo_to_dict(database)
    for path, code in guide_files():
        target = root / path
        if path == "shop/settings.py":
            code = code.replace('"NAME": "shop"', f'"NAME": "{name}"').replace(
                '"HOST": "127.0.0.1"', f'"HOST": "{info.get("host", "127.0.0.1")}"'
            )
            with target.open("a") as f:
                f.write("\n" + code)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code)
    try:
        yield root, env
    finally:
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def manage(project: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    root, env = project
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=root, capture_output=True, text=True, env=env, timeout=120
    )


def test_the_guide_from_startproject_to_the_admin(project: tuple[Path, dict[str, str]]) -> None:
    written = {path for path, _ in guide_files()}
    assert {"shop/settings.py", "orders/models.py", "shop/celery.py", "orders/admin.py"} <= written
    for step in (("makemigrations", "orders"), ("migrate",), ("check", "--database", "default")):
        res = manage(project, *step)
        assert res.returncode == 0, (step, res.stdout, res.stderr)
        assert "threadline." not in res.stderr, res.stderr  # no system check fires
    coverage = manage(project, "threadline", "coverage", "--expect", "orders_order")
    assert coverage.returncode == 0, coverage.stdout + coverage.stderr
    script = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
from orders.models import Order

user = get_user_model().objects.create_superuser("ann", password="pw")
client = Client(HTTP_HOST="localhost")  # a host DEBUG allows
client.force_login(user)
order = Order.objects.create(customer="bob", total="9.50", card_number="4111111111111111")
response = client.post(f"/admin/orders/order/{order.pk}/change/", {
    "customer": "bob", "total": "12.00", "card_number": "4111111111111111", "status": "paid"})
page = client.get(f"/admin/orders/order/{order.pk}/audit-trail/")
import threadline
from django.db import transaction
with threadline.context(actor="user:1", correlation_id="bulk-1"), transaction.atomic():
    Order.objects.bulk_create([Order(customer=f"c{i}", total="1.00") for i in range(25)])
bulk = client.get("/admin/threadline/audittrail/trace/bulk-1/").content.decode()
print(json.dumps({"user": user.pk, "status": response.status_code, "page": page.content.decode(),
                  "correlation": response.headers.get("X-Correlation-ID"), "bulk": bulk}))
"""
    res = manage(project, "shell", "-c", script)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == 302 and out["correlation"]
    page = out["page"]
    assert page.count('class="threadline-change threadline-') == 2  # the shell's insert, the admin's update
    assert f"user:{out['user']}" in page and "4111111111111111" not in page
    assert "<td>cli</td>" in page  # the shell's own write: origin cli
    bulk = out["bulk"]
    assert bulk.count('class="threadline-change"') == 20
    assert "25 changes in this transaction, the first 20 shown" in bulk
    trace = manage(project, "threadline", "trace", out["correlation"])
    assert trace.returncode == 0 and "update public.orders_order" in trace.stdout, trace.stdout
