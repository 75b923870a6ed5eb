"""What the psycopg bridge's private hooks save: run with `python bench/bridge_hooks.py`.

One single-row INSERT per transaction under a current audit context, three ways, interleaved in
each round (medians of BENCH_ROUNDS rounds of BENCH_TRANSACTIONS transactions), on an untracked
table (the bridge alone) and on a tracked one (an audited write):

- public API only: ``with threadline.transaction(conn)`` on a plain psycopg connection (psycopg's
  ``transaction()``, then one ``set_config`` statement);
- ``ThreadlineConnection.transaction()``: ``BEGIN`` and ``SET LOCAL`` sent as one command;
- ``ThreadlineConnection`` with an implicit transaction (``execute`` then ``commit``): the private
  hooks put ``BEGIN`` and ``SET LOCAL`` in front of the first statement, one round trip for all.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/

import threadline  # noqa: E402
from bench._db import scratch_database  # noqa: E402
from threadline import ThreadlineConnection  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
TRANSACTIONS = int(os.environ.get("BENCH_TRANSACTIONS", "1000"))


def _timed(step: Callable[[int], None]) -> float:
    started = time.perf_counter()
    for i in range(TRANSACTIONS):
        step(i)
    return (time.perf_counter() - started) / TRANSACTIONS * 1e6


def measure(dsn: str, table: str) -> dict[str, float]:
    plain = psycopg.connect(dsn)
    bridged: ThreadlineConnection[Any] = ThreadlineConnection.connect(dsn)
    insert = f"INSERT INTO {table} (v) VALUES (%s)"

    def public(i: int) -> None:
        with threadline.transaction(plain):
            plain.execute(insert, [i])

    def explicit(i: int) -> None:
        with bridged.transaction():
            bridged.execute(insert, [i])

    def implicit(i: int) -> None:
        bridged.execute(insert, [i])
        bridged.commit()

    ways = {
        "public API (threadline.transaction on a plain connection)": public,
        "ThreadlineConnection.transaction()": explicit,
        "ThreadlineConnection, implicit transaction": implicit,
    }
    samples: dict[str, list[float]] = {name: [] for name in ways}
    try:
        with threadline.context(actor="user:1", correlation_id="bench"):
            for _ in range(ROUNDS):
                for name, step in ways.items():
                    samples[name].append(_timed(step))
    finally:
        plain.close()
        bridged.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    with scratch_database("tl_bench_hooks") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            threadline.ddl.install(conn)
            conn.execute("CREATE TABLE plain_t (id bigserial PRIMARY KEY, v int)")
            conn.execute("CREATE TABLE audited_t (id bigserial PRIMARY KEY, v int)")
            threadline.ddl.track(conn, "audited_t")
        untracked = measure(dsn, "plain_t")
        tracked = measure(dsn, "audited_t")
    print(
        f"| way ({TRANSACTIONS} transactions x {ROUNDS} rounds, median) | untracked table | tracked table |"
    )
    print("|---|---:|---:|")
    for name in untracked:
        print(f"| {name} | {untracked[name]:.0f} µs | {tracked[name]:.0f} µs |")


if __name__ == "__main__":
    main()
