"""Tamper evidence: :func:`seal` chains the audit trail's final transactions, :func:`verify` checks it.

A seal covers the next transactions, in ``(xid, id)`` order, that can no longer change: every
transaction older than the oldest one still running has ended, so no row can join them later (a
baseline being taken holds sealing back at its transaction until it is complete). Each seal
stores the ids of the transactions it covers, a SHA-256 digest of each (its row and all its
changes, every column) and a hash over those and the previous seal's hash. Seals are written by
the audit schema's owner, in batches, off the write path: run ``threadline seal`` periodically
(a Celery beat entry is shown in ``docs/operations.md``).

:func:`verify` recomputes every digest and every link of the chain and reports the first
transaction that no longer matches (edited, deleted, or inserted into a sealed range), or a seal
that was changed or removed; the head hash printed by :func:`seal`, kept outside the database,
catches the removal of the latest seals (``expect_head``). A recorded erasure
(:mod:`threadline.ops.erasure`) or purge (:mod:`threadline.ops.retention`) is a link of the same chain
holding the new digests of the sealed transactions it rewrote (zero bytes for those it deleted),
so :func:`verify` tells it from tampering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.ops.seal_chain import audit_identifier
from threadline.ops.seal_verify import VerifyResult, verify

__all__ = ["SealResult", "VerifyResult", "seal", "verify"]

logger = logging.getLogger("threadline.seal")


@dataclass(frozen=True)
class SealResult:
    """What one :func:`seal` run did."""

    seals: int
    """Seals written by this run."""
    transactions: int
    """Transactions they cover."""
    head: str | None
    """The hash at the head of the chain (hex): keep it outside the database."""
    held_back: str | None = None
    """Why transactions that have ended were left unsealed, in words: a baseline still being
    taken (which table, since when) holds sealing back at its transaction; ``None`` otherwise."""


def seal(
    conn: psycopg.Connection[Any],
    *,
    batch_size: int = 1000,
    audit_schema: str = DEFAULT_SCHEMA,
    progress: Callable[[int], None] | None = None,
) -> SealResult:
    """Seal every final transaction not sealed yet, ``batch_size`` per seal, each seal its own
    transaction; returns the head hash. ``conn`` must not be inside a transaction."""
    audit = audit_identifier(audit_schema)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be a positive integer, got {batch_size!r}")
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ConfigurationError(
            "seal() commits after every seal: call it on a connection with no open transaction"
        )
    seals = transactions = 0
    head: str | None = None
    statement = sql.SQL("SELECT seal_id, sealed, head FROM {}.seal(%s)").format(audit)
    while True:
        with conn.transaction():
            row = conn.execute(statement, [batch_size]).fetchone()
        assert row is not None
        head = row[2]
        if not row[1]:
            break
        seals += 1
        transactions += row[1]
        if progress is not None:
            progress(transactions)
    logger.info("sealed %d transactions in %d seals; head %s", transactions, seals, head)
    held_back = _held_back(conn, audit)
    if held_back:
        logger.info("%s", held_back)
    return SealResult(seals, transactions, head, held_back)


def _held_back(conn: psycopg.Connection[Any], audit: sql.Identifier) -> str | None:
    """The baseline in progress that holds sealing back, in words, when transactions after it
    wait to be sealed."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL(
                "SELECT b.table_schema, b.table_name, b.started_at, b.rows_done, t.id,"
                "       (SELECT count(*) FROM {a}.transactions x WHERE x.xid > t.xid) AS waiting"
                "  FROM {a}.baselines b JOIN {a}.transactions t ON t.id = b.transaction_id"
                " WHERE b.finished_at IS NULL AND b.ended_at IS NULL"
                "   AND NOT EXISTS (SELECT 1 FROM (SELECT s.last_xid, s.last_id FROM {a}.seals s"
                "                                   ORDER BY s.id DESC LIMIT 1) AS p"
                "                    WHERE (t.xid, t.id) <= (p.last_xid, p.last_id))"
                " ORDER BY t.xid LIMIT 1"
            ).format(a=audit)
        ).fetchone()
    if row is None:
        return None
    schema, table, since, done, tx, waiting = row
    return (
        f"sealing is held back at transaction {tx} by the baseline of {schema}.{table} being taken"
        f" since {since.isoformat(timespec='seconds')} ({done} rows so far; {waiting} later transaction(s)"
        f" wait): finish it with threadline baseline {schema}.{table}"
    )
