"""``threadline demo``: the whole story on a fresh machine, with nothing to configure.

It starts (or uses) PostgreSQL, a Celery broker and a real worker subprocess, serves one web
request by user ``alice`` through the WSGI middleware, lets the worker do the chain and chord that
request enqueued, prints the trace and timeline of the request's correlation id, and stops every
process it started and removes its temporary files, also on Ctrl-C or error.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import wsgiref.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.errors import ThreadlineError

Say = Callable[[str], None]


class DemoError(ThreadlineError):
    """The demo could not run; the message says what to install or configure."""


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo's services are; ``None`` means "start an embedded one"."""

    dsn: str | None = None
    broker: str | None = None
    backend: str | None = None
    timeout: float = 60.0


@contextlib.contextmanager
def _embedded_postgres(root: Path, say: Say) -> Iterator[str]:
    say("starting an embedded PostgreSQL (pgserver) in a temporary directory")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # machines with no login session
        try:
            from pgserver.postgres_server import get_server  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise DemoError(
                "no PostgreSQL given and the embedded one is not installed: "
                "install the 'demo' extra (pip install '.[demo]' in a clone), or pass --dsn postgresql://..."
            ) from exc
        server = get_server(str(root / "pgdata"), cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextlib.contextmanager
def _own_database(admin_dsn: str, say: Say) -> Iterator[str]:
    name = f"threadline_demo_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise DemoError(f"cannot create the demo database through {_shown(admin_dsn)}: {exc}") from exc
    say(f"created database {name}")
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        say(f"dropped database {name}")


def _shown(dsn: str) -> str:
    """Where a DSN points, without its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the given DSN (which does not parse)"
    return f"host {parts.get('host') or 'local socket'} port {parts.get('port') or 5432} as {parts.get('user') or 'the current user'}"


@contextlib.contextmanager
def _database(settings: DemoSettings, root: Path, say: Say) -> Iterator[str]:
    if settings.dsn:
        with _own_database(settings.dsn, say) as dsn:
            yield dsn
    else:
        with _embedded_postgres(root, say) as dsn:
            yield dsn


@contextlib.contextmanager
def _worker(env: dict[str, str], log: Path, say: Say, timeout: float) -> Iterator[subprocess.Popen[bytes]]:
    from threadline.demo.app import QUEUE

    args = [
        sys.executable, "-m", "celery", "-A", "threadline.demo.app", "worker",
        "--pool", "threads", "--concurrency", "4", "--queues", QUEUE, "--loglevel", "INFO",
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    say("starting a Celery worker subprocess (threads pool)")
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the Celery worker did not start; its log:\n{_tail(log)}")
            time.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        say("stopped the worker")


def _tail(log: Path, size: int = 3000) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"


def _request(say: Say) -> str:
    """Serve ``POST /orders`` by ``alice`` through the WSGI middleware; the correlation id."""
    from threadline.demo.app import shop, user_from_header
    from threadline.propagation.web import WSGIMiddleware

    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/orders", "HTTP_X_USER": "alice"}
    wsgiref.util.setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(b"")
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.update({k.lower(): v for k, v in headers}, status=status)
        return lambda data: None

    body = b"".join(WSGIMiddleware(shop, actor_resolver=user_from_header)(environ, start_response))
    correlation_id = seen.get("x-correlation-id", "")
    say(
        f"POST /orders as alice -> {seen.get('status')} {body.decode()}  (X-Correlation-ID: {correlation_id})"
    )
    return correlation_id


def _wait_for_story(dsn: str, correlation_id: str, expected: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM threadline.transactions WHERE correlation_id = %s", [correlation_id]
            ).fetchone()
            if row is not None and row[0] >= expected:
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"only {row[0] if row else 0} of {expected} transactions arrived within {timeout:.0f} s; "
                    f"worker log:\n{_tail(log)}"
                )
            time.sleep(0.1)


def run(settings: DemoSettings, say: Say = print) -> None:
    """Run the demo; raises :class:`DemoError` with a readable message when it cannot."""
    # imported here, not with the module: it loads kombu's filesystem transport
    from threadline.demo.filesystem import URL as FILESYSTEM_BROKER

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="threadline-demo-"))
    broker = settings.broker or FILESYSTEM_BROKER
    backend = settings.backend or f"file://{root / 'results'}"
    if backend.startswith("file://"):
        Path(backend[len("file://") :]).mkdir(parents=True, exist_ok=True)
    try:
        with _database(settings, root, say) as dsn:
            env = {
                **os.environ,
                "THREADLINE_DEMO_APP_DSN": dsn,
                "THREADLINE_DEMO_APP_BROKER": broker,
                "THREADLINE_DEMO_APP_BACKEND": backend,
                "THREADLINE_DEMO_APP_FS_ROOT": str(root / "broker"),
            }
            os.environ.update({k: v for k, v in env.items() if k.startswith("THREADLINE_DEMO_APP_")})
            _prepare(dsn, say)
            say(f"broker {broker}, result backend {backend.split('://')[0]}://")
            log = root / "worker.log"
            with _worker(env, log, say, settings.timeout):
                correlation_id = _request(say)
                from threadline.demo.app import EXPECTED_TRANSACTIONS

                say(
                    "waiting for the worker: a chain (reserve stock -> charge card) and a chord (email + sms -> done)"
                )
                _wait_for_story(dsn, correlation_id, EXPECTED_TRANSACTIONS, settings.timeout, log)
            _show(dsn, correlation_id, say)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s; everything the demo started is stopped and removed")


def _prepare(dsn: str, say: Say) -> None:
    from threadline import ddl
    from threadline.demo.app import SCHEMA_SQL, TRACKED

    with psycopg.connect(dsn, autocommit=True) as conn:
        ddl.install(conn)
        conn.execute(SCHEMA_SQL.encode())
        for table, masked in TRACKED.items():
            ddl.track(conn, table, mask=masked)
    say(f"installed the audit schema; tracking {', '.join(TRACKED)} (payments.card masked)")


def _show(dsn: str, correlation_id: str, say: Say) -> None:
    import threadline

    with psycopg.connect(dsn) as conn:
        story = threadline.trace(conn, correlation_id)
        changes = threadline.timeline(conn, correlation_id=correlation_id, limit=100)
    say(f"\n== trace of {correlation_id}: the request and every task it caused ==\n")
    say(story.render())
    say(f"\n== timeline of {correlation_id} ({len(changes)} changes, oldest first) ==\n")
    for change in changes:
        tx = change.transaction
        actor = str(tx.actor) if tx and tx.actor else "-"
        origin = (tx.origin if tx else None) or "-"
        say(
            f"{change.captured_at:%H:%M:%S.%f}  {change.op:<6}  {change.table_name:<13} "
            f"{_key(change.pk):<24} {actor:<11} {origin:<6}  {', '.join(change.changed_fields or [])}"
        )


def _key(pk: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in (pk or {}).items())
