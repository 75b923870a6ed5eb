"""Backend CPU instructions per audited transaction, counted with valgrind (`make bench-instructions`).

Timings of single-row transactions move with everything else the machine does; instruction counts
do not. This script makes a throw-away PostgreSQL cluster (initdb, in a temporary folder), creates
the same tables as bench/capture.py (no trigger, the statement-level floor trigger, the row-level
upsert reference, threadline), then runs the same single-row `UPDATE` transactions through a
single-user backend under `valgrind --tool=callgrind`, 100 and then 300 of them, each time from
the same copy of the cluster. The difference divided by 200 is what one transaction costs,
start-up excluded. Every figure is deterministic for a given PostgreSQL build.

Needs valgrind and PostgreSQL's server binaries (`pg_config --bindir`, or BENCH_PG_BINDIR). Run as
root, the cluster is made and run as the `postgres` user.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

from bench.capture import (  # noqa: E402
    CONTEXT,
    FLOOR_STATEMENT,
    SETUP,
    TABLE_ROWS,
    UPSERT_REFERENCE,
    track_drift_safe,
)
from threadline import ddl  # noqa: E402

TABLES = {
    "t_plain": "no trigger",
    "t_sfloor": "statement-level floor trigger",
    "t_ref": "row-level upsert reference",
    "t_tl": "threadline",
    "t_tlm": "threadline, one masked column",
    "t_tld": "threadline, drift-safe code",
    "t_tldm": "threadline, drift-safe code, one masked column",
}
WARM_TRANSACTIONS = 2000


def bindir() -> Path:
    configured = os.environ.get("BENCH_PG_BINDIR")
    if configured:
        return Path(configured)
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        found = Path(out.stdout.strip())
        if (found / "initdb").exists():
            return found
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        sys.exit("PostgreSQL server binaries not found: set BENCH_PG_BINDIR")
    return candidates[-1].parent


def as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_server_user(cmd), check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


# tables counted again with ten single-row updates per transaction: a regression of the statements
# after a transaction's first (which look its row up) shows there
TEN_UPDATE_TABLES = ("t_plain", "t_sfloor", "t_ref", "t_tl")
# tables counted again in the first transaction of a session (a new connection)
FIRST_TABLES = TEN_UPDATE_TABLES


# the context of a web request and of a Celery task, as the bridges set them, beside the short
# one every other figure uses: how the context's size and shape move the transaction's cost
CONTEXTS = {
    "the benchmark's: an actor and a correlation id (66 bytes)": CONTEXT,
    "a web request's: an actor with a display name, correlation and request ids, origin (190 bytes)": (
        '{"actor":{"display":"Alice Example","id":"42","type":"user"},'
        '"correlation_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553","origin":"web",'
        '"request_id":"95193573-2617-4f9e-94b5-a1879d5b98e7","v":1}'
    ),
    "a Celery task's, with its job (366 bytes)": (
        '{"actor":{"id":"42","type":"user"},"causation_id":"61f03d52-692e-4060-9f0d-d70de2fc2a07",'
        '"correlation_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553","job":{"id":"e17e66a5-4b99-445d-bd79-e61d043b838d",'
        '"name":"shop.tasks.send_receipt","parent_id":"61f03d52-692e-4060-9f0d-d70de2fc2a07","retries":0,'
        '"root_id":"1e7eb779-0af6-4ce1-b2c2-08ad63616553"},"origin":"celery","v":1}'
    ),
}
CONTEXTS["a root task's, whose job has no parent (`null`)"] = CONTEXTS[
    "a Celery task's, with its job (366 bytes)"
].replace('"parent_id":"61f03d52-692e-4060-9f0d-d70de2fc2a07"', '"parent_id":null')
CONTEXTS["a web request's whose display name holds a quote (an escape: the complete checks)"] = CONTEXTS[
    "a web request's: an actor with a display name, correlation and request ids, origin (190 bytes)"
].replace("Alice Example", 'Alice \\"Al\\" Example')


def script(table: str, n: int, updates: int = 1, context: str = CONTEXT) -> str:
    """``n`` transactions, each setting ``context`` and making ``updates`` single-row updates."""
    rnd = random.Random(1)
    lines = []
    for _ in range(n):
        first = rnd.randint(WARM_TRANSACTIONS + 1, TABLE_ROWS - updates)
        statements = " ".join(f"UPDATE {table} SET a = a + 1 WHERE id = {first + i};" for i in range(updates))
        lines.append(f"BEGIN; SET LOCAL threadline.context = '{context}'; {statements} COMMIT;\n")
    return "".join(lines)


def count_script(pg: Path, pristine: Path, work: Path, text: str) -> int:
    """Instructions a single-user backend spends on ``text``, from a fresh copy of ``pristine``."""
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["cp", "-a", str(pristine), str(work)], check=True)  # keeps the owner
    out = work.parent / "callgrind.out"
    proc = subprocess.run(
        as_server_user(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                str(pg / "postgres"),
                "--single",
                "-D",
                str(work),
                "-F",
                "-c",
                "synchronous_commit=off",
                "-c",
                "autovacuum=off",
                "bench",
            ]
        ),
        input=text,
        text=True,
        capture_output=True,
        check=True,
    )
    if " ERROR: " in proc.stderr:
        raise RuntimeError(f"the backend reported an error:\n{proc.stderr[-2000:]}")
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if not match:
        raise RuntimeError(f"cannot read valgrind's summary:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def instructions(
    pg: Path, pristine: Path, work: Path, table: str, n: int, updates: int = 1, context: str = CONTEXT
) -> int:
    return count_script(pg, pristine, work, script(table, n, updates, context))


def valgrind_server() -> Path:
    """PostgreSQL's server binaries, once valgrind is known to be there (else exit with why)."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    return bindir()


@contextmanager
def scratch_root(prefix: str) -> Iterator[Path]:
    """A temporary folder the server user may write (for a throw-away cluster), removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pristine_cluster(pg: Path, root: Path, fill: Callable[[psycopg.Connection[Any]], None]) -> Path:
    """A stopped cluster in ``root / "pristine"`` whose database ``bench`` ``fill`` has set up
    (then vacuumed, analysed and checkpointed), for each counted run to start from a copy."""
    data = root / "data"
    run([str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
    port = str(54000 + os.getpid() % 1000)
    run(
        [str(pg / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
         f"-p {port} -k {root} -c listen_addresses=''", "start"]
    )  # fmt: skip
    try:
        with psycopg.connect(
            f"host={root} port={port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE bench")
        with psycopg.connect(f"host={root} port={port} user=postgres dbname=bench", autocommit=True) as conn:
            fill(conn)
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
    finally:
        run([str(pg / "pg_ctl"), "-D", str(data), "-w", "stop"])
    pristine = root / "pristine"
    data.rename(pristine)
    return pristine


def fill(conn: psycopg.Connection[Any]) -> None:
    """The tables of TABLES, their triggers, and some history, as a live database has."""
    for table in TABLES:
        conn.execute(SETUP.format(t=table, n=TABLE_ROWS).encode())
    conn.execute(FLOOR_STATEMENT.encode())
    conn.execute(UPSERT_REFERENCE.encode())
    ddl.install(conn)
    ddl.track(conn, "t_tl")
    ddl.track(conn, "t_tlm", mask=["c"])
    track_drift_safe(conn, "t_tld")
    track_drift_safe(conn, "t_tldm", mask=["c"])
    for table in TABLES:
        for i in range(1, WARM_TRANSACTIONS + 1):
            conn.execute(
                f"BEGIN; SET LOCAL threadline.context = '{CONTEXT}'; "
                f"UPDATE {table} SET a = a + 1 WHERE id = {i}; COMMIT".encode()
            )


def main() -> None:
    pg = valgrind_server()
    with scratch_root("threadline-instructions-") as root:
        pristine = pristine_cluster(pg, root, fill)
        data = root / "data"

        started = time.monotonic()
        per_tx: dict[str, float] = {}
        for table in TABLES:
            low = instructions(pg, pristine, data, table, 100)
            high = instructions(pg, pristine, data, table, 300)
            per_tx[table] = (high - low) / 200
        version = run([str(pg / "postgres"), "--version"]).stdout.strip()
        print(f"# Backend instructions per single-row UPDATE transaction ({version})\n")
        print(
            "Counted with valgrind (callgrind): 300 minus 100 transactions, divided by 200 "
            f"(took {time.monotonic() - started:.0f} s). Overheads are over no trigger.\n"
        )
        print(
            "| trigger | instructions per transaction | overhead | overhead / floor's | overhead / reference's |"
        )
        print("|---|---:|---:|---:|---:|")
        base = per_tx["t_plain"]
        floor, reference = per_tx["t_sfloor"] - base, per_tx["t_ref"] - base
        for table, label in TABLES.items():
            over = per_tx[table] - base
            ratios = f"{over / floor:.2f}x | {over / reference:.2f}x" if table != "t_plain" else " | "
            print(f"| {label} | {per_tx[table]:,.0f} | {over:+,.0f} | {ratios} |")

        ten: dict[str, float] = {}
        for table in TEN_UPDATE_TABLES:
            low = instructions(pg, pristine, data, table, 50, updates=10)
            high = instructions(pg, pristine, data, table, 150, updates=10)
            ten[table] = (high - low) / 100
        print("\n# The same, ten single-row updates in one transaction\n")
        print(
            "| trigger | instructions per transaction | overhead | overhead of each update after the first |"
        )
        print("|---|---:|---:|---:|")
        for table in TEN_UPDATE_TABLES:
            over = ten[table] - ten["t_plain"]
            later = (over - (per_tx[table] - base)) / 9 if table != "t_plain" else 0.0
            shown = f"{later:+,.0f}" if table != "t_plain" else ""
            print(f"| {TABLES[table]} | {ten[table]:,.0f} | {over:+,.0f} | {shown} |")

        print("\n# The same single-row update, by context\n")
        print("| context | threadline's overhead |")
        print("|---|---:|")
        for label, context in CONTEXTS.items():
            # no trigger counted with the same context: the SET LOCAL's own cost grows with its text
            per_context = [
                (
                    instructions(pg, pristine, data, table, 300, context=context)
                    - instructions(pg, pristine, data, table, 100, context=context)
                )
                / 200
                for table in ("t_tl", "t_plain")
            ]
            print(f"| {label} | {per_context[0] - per_context[1]:+,.0f} |")

        # A new connection pays once for what later transactions find cached: loading PL/pgSQL,
        # compiling the trigger function, preparing and planning its statements, opening the audit
        # tables and their indexes. Counted as one transaction after `SELECT 1` against none.
        print("\n# The first such transaction of a new session\n")
        print("| trigger | first transaction | over no trigger | each later one, over no trigger |")
        print("|---|---:|---:|---:|")
        session_start = count_script(pg, pristine, data, "SELECT 1;\n")
        first = {
            table: count_script(pg, pristine, data, "SELECT 1;\n" + script(table, 1)) - session_start
            for table in FIRST_TABLES
        }
        for table in FIRST_TABLES:
            first_over = f"{first[table] - first['t_plain']:+,}" if table != "t_plain" else ""
            later_over = f"{per_tx[table] - base:+,.0f}" if table != "t_plain" else ""
            print(f"| {TABLES[table]} | {first[table]:,} | {first_over} | {later_over} |")


if __name__ == "__main__":
    main()
