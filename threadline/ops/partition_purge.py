"""Retention in a partitioned store: drop whole partitions that lie entirely before the cut-off.

A period's ``transactions`` and ``changes`` partitions hold the same transactions (a change is
kept in its transaction's partition), so they are dropped together. A period is dropped only when
its range ends at or before the cut-off, every change in it was captured before the cut-off (a
transaction that ran across the cut-off keeps its period to the batched purge), and no baseline
still being taken records into it. Dropping a partition is a metadata change: no row-by-row
delete, next to no WAL, and the space returns to the operating system at once.

Each period is dropped in its own transaction under ``lock_timeout`` (dropping a partition locks
its parent table for an instant) and retried when the table is busy. When the trail is sealed,
the same transaction appends ``purge`` links to the seal chain naming every sealed transaction
the period held, so ``verify`` reports the purge, not tampering.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from threadline.core.busy import TABLES_BUSY
from threadline.ops.observability import emit
from threadline.ops.seal_chain import DIGEST_SIZE, lock_chain, purge_detail

logger = logging.getLogger("threadline.retention")

LINK_SIZE = 100_000
"""Sealed transactions named per ``purge`` link when a partition is dropped."""


@dataclass(frozen=True)
class DroppedPeriod:
    """One period whose partitions were (or, in a dry run, would be) dropped."""

    transactions_partition: str
    changes_partition: str
    range_from: datetime
    range_to: datetime
    transactions: int
    changes: int


def droppable_periods(
    conn: psycopg.Connection[Any], audit_schema: str, cutoff: datetime
) -> list[DroppedPeriod]:
    """The periods that may be dropped for ``cutoff``, oldest first, with their row counts."""
    audit = sql.Identifier(audit_schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT t.partition, c.partition, t.range_from, t.range_to"
            "  FROM {a}.partitions() t JOIN {a}.partitions() c"
            "    ON c.parent = 'changes' AND c.range_from = t.range_from AND c.range_to = t.range_to"
            " WHERE t.parent = 'transactions' AND t.range_to <= %s ORDER BY t.range_from"
        ).format(a=audit),
        [cutoff],
    ).fetchall()
    out = []
    for tx_part, ch_part, lo, hi in rows:
        tx_table, ch_table = sql.Identifier(audit_schema, tx_part), sql.Identifier(audit_schema, ch_part)
        blocked = conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {c} WHERE captured_at >= %(cutoff)s)"
                " OR EXISTS (SELECT 1 FROM {a}.baselines b JOIN {t} x ON x.id = b.transaction_id"
                "             WHERE b.finished_at IS NULL AND b.ended_at IS NULL)"
            ).format(a=audit, c=ch_table, t=tx_table),
            {"cutoff": cutoff},
        ).fetchone()
        if blocked and blocked[0]:
            logger.info("partition %s holds changes captured after the cut-off: purged in batches", ch_part)
            continue
        counts = conn.execute(
            sql.SQL("SELECT (SELECT count(*) FROM {}), (SELECT count(*) FROM {})").format(tx_table, ch_table)
        ).fetchone()
        assert counts is not None
        out.append(DroppedPeriod(tx_part, ch_part, lo, hi, int(counts[0]), int(counts[1])))
    return out


def drop_periods(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    periods: list[DroppedPeriod],
    *,
    sealed: bool,
    cutoff: datetime | None = None,
    lock_timeout: float = 1.0,
    attempts: int = 10,
) -> list[DroppedPeriod]:
    """Drop each period's two partitions, one period per transaction; returns those dropped.

    ``sealed``: record the sealed transactions dropped in the seal chain, as a purge up to
    ``cutoff`` (the purge's cut-off, kept in its links)."""
    done = []
    for period in periods:
        for attempt in range(1, attempts + 1):
            t0 = time.monotonic()
            try:
                with conn.transaction():
                    cur = conn.cursor()
                    if sealed:
                        lock_chain(cur, audit_schema)
                        detail = None if cutoff is None else purge_detail(cutoff)
                        _record_in_chain(cur, audit_schema, period.transactions_partition, detail)
                    cur.execute(
                        "SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"]
                    )
                    cur.execute(
                        sql.SQL("DROP TABLE {}, {}").format(
                            sql.Identifier(audit_schema, period.changes_partition),
                            sql.Identifier(audit_schema, period.transactions_partition),
                        )
                    )
                break
            except TABLES_BUSY:
                if attempt == attempts:
                    raise
                logger.info(
                    "partition %s is busy, retrying (%d of %d)", period.changes_partition, attempt, attempts
                )
                time.sleep(min(0.1 * 2**attempt, 5.0))
        seconds = time.monotonic() - t0
        logger.info(
            "dropped partitions %s and %s (%d transactions, %d changes) in %.3f s",
            period.transactions_partition,
            period.changes_partition,
            period.transactions,
            period.changes,
            seconds,
        )
        emit(
            "purge.partition",
            partition=period.changes_partition,
            transactions=period.transactions,
            changes=period.changes,
            seconds=seconds,
            audit_schema=audit_schema,
        )
        done.append(period)
    return done


def _record_in_chain(
    cur: psycopg.Cursor[Any], audit_schema: str, tx_partition: str, detail: str | None
) -> None:
    """Append ``purge`` links naming the sealed transactions of ``tx_partition`` (about to be
    dropped), :data:`~threadline.ops.seal.LINK_SIZE` per link, each recording them as deleted."""
    statement = sql.SQL(
        "WITH prev AS (SELECT * FROM {a}.seals ORDER BY id DESC LIMIT 1),"
        " gone AS (SELECT t.id FROM {p} t, prev"
        "           WHERE (t.xid, t.id) <= (prev.last_xid, prev.last_id) AND t.id > %(after)s"
        "           ORDER BY t.id LIMIT %(n)s),"
        " d AS (SELECT array_agg(id ORDER BY id) AS ids,"
        "              decode(repeat('00', %(size)s * count(*)::integer), 'hex') AS digests FROM gone)"
        " INSERT INTO {a}.seals (kind, format, last_xid, last_id, transaction_ids, digests, changes, prev_hash,"
        "                        hash, detail)"
        " SELECT 'purge', 2, prev.last_xid, prev.last_id, d.ids, d.digests, 0, prev.hash,"
        "        {a}.seal_hash('purge', 2, prev.hash, prev.last_xid, prev.last_id, d.ids, d.digests, NULL,"
        "                      %(detail)s::text, NULL), %(detail)s::text"
        "   FROM prev, d WHERE d.ids IS NOT NULL"
        " RETURNING cardinality(transaction_ids), transaction_ids[cardinality(transaction_ids)]"
    ).format(a=sql.Identifier(audit_schema), p=sql.Identifier(audit_schema, tx_partition))
    # their salts go with them: the digests the seals recorded can no longer be tested
    cur.execute(
        sql.SQL("DELETE FROM {a}.seal_salts s USING {p} t WHERE s.transaction_id = t.id").format(
            a=sql.Identifier(audit_schema), p=sql.Identifier(audit_schema, tx_partition)
        )
    )
    after = 0
    while True:
        row = cur.execute(
            statement, {"after": after, "n": LINK_SIZE, "size": DIGEST_SIZE, "detail": detail}
        ).fetchone()
        if row is None or row[0] < LINK_SIZE:
            return
        after = row[1]
