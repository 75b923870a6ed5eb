"""Web and ORM bridge benchmark: middleware overhead per request, bridge cost per transaction.

Creates its own database (from $THREADLINE_DSN, default the loopback PostgreSQL), measures, prints
a Markdown summary, drops the database. Every figure is the median of interleaved rounds (the
baseline and the measured variant alternate within each round).

- WSGI / ASGI middleware: µs per request over the bare app (an in-process call with a prepared
  environ / scope; the app does nothing), with a correlation header and an actor resolver.
  Measured as CPU time of the benchmark thread, so that other processes competing for the CPU
  do not inflate it.
- Django ORM bridge: one ``Model.objects.create()`` per transaction (autocommit, and inside
  ``atomic()``) on a bridged connection vs a plain one, both with a context current.
- SQLAlchemy bridge: one Core ``INSERT`` in ``engine.begin()`` on an instrumented engine vs a
  plain one, both with a context current; with psycopg's default cursor (parameters bound
  server-side) and with ``connect_args={"cursor_factory": psycopg.ClientCursor}``.

The ORM figures are measured on an untracked table (the bridge alone) and on a tracked one (what an
audited write costs with the context vs the same write recorded without any context).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import threadline  # noqa: E402
from threadline import ActorRef  # noqa: E402
from threadline.propagation.web import ASGIMiddleware, WSGIMiddleware  # noqa: E402

ADMIN_DSN = os.environ.get("THREADLINE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))
TRANSACTIONS = int(os.environ.get("BENCH_TRANSACTIONS", "300"))
SYNC_COMMIT = "on" if os.environ.get("BENCH_SYNC_COMMIT") == "on" else "off"
ORM_ONLY = os.environ.get("BENCH_ORM_ONLY") == "1"  # skip the middleware part
# Pin this process to one CPU and every database backend it opens to the others (BENCH_PIN=0 to
# leave placement to the scheduler). On a small machine a loopback round trip costs very different
# times depending on whether the client and its backend share a CPU, and the plain and bridged
# connections otherwise land differently from run to run (the same A/B has swung from -37% to
# +70%); pinned, both variants get the same placement, as with a database on another host.
PIN = os.environ.get("BENCH_PIN", "1") == "1" and hasattr(os, "sched_setaffinity")


def pin_client() -> bool:
    """Pin this process to its first CPU; False when there are fewer than two or it is not allowed."""
    if not PIN:
        return False
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return False
    os.sched_setaffinity(0, {cpus[0]})
    return True


def pin_backend(pid: int) -> None:
    """Pin a database backend (same machine) to the CPUs this process does not use."""
    if not PINNED:
        return
    others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(pid, others)
    except OSError as exc:  # another user's process, or a server on another host
        print(f"(could not pin backend {pid}: {exc})")


PINNED = False
CTX = threadline.AuditContext(actor=ActorRef.user("42"), correlation_id="bench-corr", origin="web")


class Samples(dict[str, float]):
    """Median µs per variant, plus each round's samples for paired ratios."""

    rounds: dict[str, list[float]]

    def ratio(self, base: str, variant: str) -> float:
        """Median over rounds of variant / base measured in the same round (drift cancels out)."""
        return statistics.median(v / b for b, v in zip(self.rounds[base], self.rounds[variant], strict=True))


def interleaved(variants: dict[str, Callable[[], float]], rounds: int = ROUNDS) -> Samples:
    """Median over rounds of each variant's per-operation time (variants alternate each round)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        order = list(variants.items())
        if i % 2:
            order.reverse()
        for name, run in order:
            samples[name].append(run())
    out = Samples({name: statistics.median(values) for name, values in samples.items()})
    out.rounds = samples
    return out


# -- middleware ---------------------------------------------------------------------------------


def bench_wsgi() -> dict[str, float]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "REMOTE_ADDR": "10.1.2.3",
        "HTTP_X_CORRELATION_ID": "0b8a3f0e-6c55-4c4e-9a57-2b0f7d3c9e11",
        "HTTP_X_USER": "42",
    }
    resolver = lambda environ: ActorRef.user(environ["HTTP_X_USER"])  # noqa: E731
    wrapped = WSGIMiddleware(app, actor_resolver=resolver)
    generated = WSGIMiddleware(app)
    bare_env = {k: v for k, v in environ.items() if k != "HTTP_X_CORRELATION_ID"}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        pass

    def timed(target: Any, env: dict[str, Any]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.thread_time()
            for _ in range(REQUESTS):
                target(env, start_response)
            return (time.thread_time() - t0) / REQUESTS * 1e6

        return run

    return interleaved(
        {
            "bare": timed(app, environ),
            "middleware": timed(wrapped, environ),
            "middleware, id generated, no resolver": timed(generated, bare_env),
        }
    )


def bench_asgi() -> dict[str, float]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {
        "type": "http",
        "headers": [
            (b"host", b"x"),
            (b"x-correlation-id", b"0b8a3f0e-6c55-4c4e-9a57-2b0f7d3c9e11"),
            (b"x-user", b"42"),
        ],
        "client": ("10.1.2.3", 4000),
    }
    wrapped = ASGIMiddleware(app, actor_resolver=lambda scope: ActorRef.user("42"))

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request"}

    loop = asyncio.new_event_loop()

    def timed(target: Any) -> Callable[[], float]:
        async def many() -> None:
            for _ in range(REQUESTS):
                await target(scope, receive, send)

        def run() -> float:
            t0 = time.thread_time()
            loop.run_until_complete(many())
            return (time.thread_time() - t0) / REQUESTS * 1e6

        return run

    try:
        return interleaved({"bare": timed(app), "middleware": timed(wrapped)})
    finally:
        loop.close()


# -- ORM bridges --------------------------------------------------------------------------------


def bench_django(dsn: str, table: str) -> Samples:
    import django
    from django.conf import settings

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": info["dbname"],
        "USER": info.get("user", ""),
        "PASSWORD": info.get("password", ""),
        "HOST": info.get("host", ""),
        "PORT": info.get("port", ""),
        "OPTIONS": {"options": info.get("options", "")},
    }
    if not settings.configured:
        settings.configure(
            DATABASES={"default": db, "plain": dict(db), "bridged": dict(db)},
            INSTALLED_APPS=[],
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
        django.setup()
    from django.db import connections, models, transaction

    from threadline.propagation.django import bridge_connection

    model = _django_model(models, table)
    connections["plain"].ensure_connection()
    connections["bridged"].ensure_connection()
    bridge_connection(connections["bridged"])
    for alias in ("plain", "bridged"):
        pin_backend(connections[alias].connection.pgconn.backend_pid)

    def timed(alias: str, atomic: bool) -> Callable[[], float]:
        manager = model.objects.using(alias)

        def run() -> float:
            with threadline.use_context(CTX):
                t0 = time.perf_counter()
                for _ in range(TRANSACTIONS):
                    if atomic:
                        with transaction.atomic(using=alias):
                            manager.create(title="x")
                    else:
                        manager.create(title="x")
                return (time.perf_counter() - t0) / TRANSACTIONS * 1e6

        return run

    return interleaved(
        {
            "autocommit, plain": timed("plain", False),
            "autocommit, bridged": timed("bridged", False),
            "atomic, plain": timed("plain", True),
            "atomic, bridged": timed("bridged", True),
        }
    )


_models: dict[str, Any] = {}


def _django_model(models: Any, table: str) -> Any:
    if table not in _models:
        meta = type("Meta", (), {"db_table": table, "app_label": "bench"})
        attrs = {"__module__": __name__, "Meta": meta, "title": models.TextField()}
        _models[table] = type("Row" + table.title().replace("_", ""), (models.Model,), attrs)
    return _models[table]


def bench_sqlalchemy(dsn: str, table: str, client_binding: bool = False) -> Samples:
    from sqlalchemy import text

    from threadline.propagation.sqlalchemy import install

    plain = _sa_engine(dsn, client_binding)
    bridged = _sa_engine(dsn, client_binding)
    install(bridged)
    stmt = text(f"INSERT INTO {table} (title) VALUES ('x')")

    def timed(engine: Any) -> Callable[[], float]:
        def run() -> float:
            with threadline.use_context(CTX), engine.connect() as conn:
                t0 = time.perf_counter()
                for _ in range(TRANSACTIONS):
                    with conn.begin():
                        conn.execute(stmt)
                return (time.perf_counter() - t0) / TRANSACTIONS * 1e6

        return run

    try:
        return interleaved({"plain": timed(plain), "instrumented": timed(bridged)})
    finally:
        plain.dispose()
        bridged.dispose()


def _sa_engine(dsn: str, client_binding: bool = False) -> Any:
    from sqlalchemy import create_engine, event

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    url = f"postgresql+psycopg://{info.get('user', '')}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{info['dbname']}"
    connect_args: dict[str, Any] = {"options": info.get("options", "")}
    if client_binding:
        connect_args["cursor_factory"] = psycopg.ClientCursor
    engine = create_engine(url, pool_size=1, connect_args=connect_args)
    event.listen(engine, "connect", lambda dbapi_conn, _record: pin_backend(dbapi_conn.pgconn.backend_pid))
    return engine


def pct(samples: Samples, base: str, variant: str) -> str:
    """The paired median ratio as a percentage over the baseline."""
    return f"{(samples.ratio(base, variant) - 1) * 100:+.1f}%"


def main() -> None:
    global PINNED
    PINNED = pin_client()
    name = f"threadline_bench_web_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    # synchronous_commit off by default: the commit's WAL flush would drown the per-transaction
    # difference being measured; both variants run with the same setting. BENCH_SYNC_COMMIT=on
    # measures what an application with PostgreSQL's default durability sees.
    dsn = psycopg.conninfo.make_conninfo(
        ADMIN_DSN, dbname=name, options=f"-c synchronous_commit={SYNC_COMMIT}"
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            threadline.ddl.install(conn)
            for table in ("bench_plain_rows", "bench_tracked_rows"):
                conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, title text NOT NULL)")
            threadline.ddl.track(conn, "public.bench_tracked_rows")
        print(
            f"# Web and ORM bridge benchmark ({ROUNDS} interleaved rounds, medians, "
            f"synchronous_commit={SYNC_COMMIT}, "
            f"{'client and backends pinned to separate CPUs' if PINNED else 'no CPU pinning'})\n"
        )
        if not ORM_ONLY:
            wsgi = bench_wsgi()
            asgi = bench_asgi()
            print(f"WSGI µs/request: {wsgi}")
            print(
                f"  overhead: {wsgi['middleware'] - wsgi['bare']:.2f} µs (id and actor from headers), "
                f"{wsgi['middleware, id generated, no resolver'] - wsgi['bare']:.2f} µs (id generated)"
            )
            print(f"ASGI µs/request: {asgi}")
            print(f"  overhead: {asgi['middleware'] - asgi['bare']:.2f} µs")
        for table in ("bench_plain_rows", "bench_tracked_rows"):
            dj = bench_django(dsn, table)
            sa = bench_sqlalchemy(dsn, table)
            print(f"\n{table}: Django µs/transaction { ({k: round(v, 1) for k, v in dj.items()}) }")
            print(
                f"  autocommit {pct(dj, 'autocommit, plain', 'autocommit, bridged')}, "
                f"atomic {pct(dj, 'atomic, plain', 'atomic, bridged')} (paired medians)"
            )
            print(f"{table}: SQLAlchemy µs/transaction { ({k: round(v, 1) for k, v in sa.items()}) }")
            print(f"  {pct(sa, 'plain', 'instrumented')} (paired median)")
            sac = bench_sqlalchemy(dsn, table, client_binding=True)
            print(
                f"{table}: SQLAlchemy, ClientCursor µs/transaction { ({k: round(v, 1) for k, v in sac.items()}) }"
            )
            print(f"  {pct(sac, 'plain', 'instrumented')} (paired median)")
    finally:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
