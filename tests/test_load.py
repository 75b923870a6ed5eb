"""Load: 8 concurrent writers, each transaction with its own context; afterwards every change is
accounted for (count equals the writes made) and attributed to its own context. The full-size
run (8 x 10,000) with throughput is ``bench/load.py``."""

from __future__ import annotations

from .load_writers import check, run_writers, setup

WRITERS = 8
TRANSACTIONS = 250


def test_concurrent_writers_every_change_accounted_and_attributed(database: str) -> None:
    setup(database)
    run_writers(database, WRITERS, TRANSACTIONS)
    assert check(database, WRITERS, TRANSACTIONS) == {
        "changes": 2 * WRITERS * TRANSACTIONS,
        "transactions": WRITERS * TRANSACTIONS,
    }
