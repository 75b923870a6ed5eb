"""Through a real PgBouncer in transaction pooling mode: many clients with different contexts share
few server connections, and every transaction row carries its own client's context.

The test starts its own ``pgbouncer`` (Debian package ``pgbouncer``) on a free loopback port with
its own configuration in a temporary directory, in front of the test database.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import threadline
from threadline import ActorRef

CLIENTS = 16
TRANSACTIONS = 25
POOL_SIZE = 3


def _pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    if found is None:
        message = "pgbouncer is not installed: apt-get install pgbouncer (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)  # CI installs it: its absence there is a failure
        pytest.skip(message)  # an optional tool on a developer's machine, reported by -rs
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def bouncer(database: str) -> Iterator[str]:
    """DSN of the test database through a transaction-pooling PgBouncer."""
    info = psycopg.conninfo.conninfo_to_dict(database)
    if str(info.get("host", "")).startswith("/") and not os.environ.get("CI"):
        # pgbouncer drops root privileges and cannot reach the embedded server's private socket
        pytest.skip("PgBouncer needs a PostgreSQL reachable over TCP; the suite runs on the embedded server")
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="threadline-pgbouncer-"))
    tmp.chmod(0o755)  # pgbouncer drops root privileges (-u postgres) and must read its files
    (tmp / "userlist.txt").write_text(f'"{info.get("user", "postgres")}" ""\n')
    (tmp / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{info['dbname']} = host={info.get('host', '127.0.0.1')} port={info.get('port', 5432)}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp / 'userlist.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\nmin_pool_size = 0\n"
        f"reserve_pool_size = 0\nmax_client_conn = 200\nmax_db_connections = {POOL_SIZE}\n"
        f"logfile = {tmp / 'pgbouncer.log'}\npidfile = {tmp / 'pgbouncer.pid'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for f in tmp.iterdir():
        f.chmod(0o644)
    args = [_pgbouncer(), str(tmp / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root: it switches to postgres
        args[1:1] = ["-u", "postgres"]
        shutil.chown(tmp, "postgres")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    dsn = psycopg.conninfo.make_conninfo(database, host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(dsn, connect_timeout=2, prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (tmp / "pgbouncer.log").read_text() if (tmp / "pgbouncer.log").exists() else ""
                    out = proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else ""
                    pytest.fail(f"pgbouncer did not start:\n{out}\n{log}", pytrace=False)
                time.sleep(0.1)
        yield dsn
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def test_each_transaction_keeps_its_own_clients_context(bouncer: str, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute("DROP SCHEMA IF EXISTS pgb CASCADE")
        admin.execute("CREATE SCHEMA pgb")
        admin.execute(
            "CREATE TABLE pgb.events (client int, seq int, backend int, touched bool NOT NULL DEFAULT false, PRIMARY KEY (client, seq))"
        )
        threadline.ddl.track(admin, "pgb.events")
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> None:
        try:
            with psycopg.connect(bouncer, prepare_threshold=None, autocommit=True) as conn:
                start.wait()
                for seq in range(TRANSACTIONS):
                    if seq % 5 == 4:  # no context: must not inherit another client's (or its own last)
                        conn.execute(
                            "INSERT INTO pgb.events (client, seq, backend) VALUES (%s, %s, pg_backend_pid())",
                            [n, seq],
                        )
                        continue
                    with (
                        threadline.context(actor=ActorRef.user(str(n)), correlation_id=f"c-{n}-{seq}"),
                        threadline.transaction(conn),
                    ):
                        conn.execute(
                            "INSERT INTO pgb.events (client, seq, backend) VALUES (%s, %s, pg_backend_pid())",
                            [n, seq],
                        )
                        time.sleep(0.001)  # hold the server connection a little: interleave clients
                        conn.execute(
                            "UPDATE pgb.events SET touched = true WHERE client = %s AND seq = %s", [n, seq]
                        )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with psycopg.connect(database, autocommit=True) as admin:
        threadline.ddl.untrack(admin, "pgb.events")  # later tests find only their own tracked tables
        rows = admin.execute(
            """
            SELECT (c.pk->>'client')::int, (c.pk->>'seq')::int, c.op, t.actor, t.correlation_id, t.context_error
              FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
             WHERE c.table_schema = 'pgb'
            """
        ).fetchall()
        backends = admin.execute("SELECT count(DISTINCT backend) FROM pgb.events").fetchone()
    assert len(rows) == CLIENTS * (
        TRANSACTIONS + TRANSACTIONS * 4 // 5
    )  # an insert each, an update with context
    for client, seq, op, actor, correlation_id, error in rows:
        assert error is None
        if seq % 5 == 4:
            assert (actor, correlation_id) == (None, None), (client, seq, op, actor, correlation_id)
        else:
            assert actor == {"type": "user", "id": str(client)} and correlation_id == f"c-{client}-{seq}", (
                client,
                seq,
                op,
                actor,
                correlation_id,
            )
    assert backends is not None and backends[0] <= POOL_SIZE < CLIENTS  # really multiplexed
