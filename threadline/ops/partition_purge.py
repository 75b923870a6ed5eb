"""Retention in a partitioned store: drop whole partitions that lie entirely before the cut-off.

A period's ``transactions`` and ``changes`` partitions hold the same transactions (a change is
kept in its transaction's partition), so they are dropped together. A period is dropped only when
its range ends at or before the cut-off, every change in it was captured before the cut-off (a
transaction that ran across the cut-off keeps its period to the batched purge), and no baseline
still being taken records into it. Dropping a partition is a metadata change: no row-by-row
delete, next to no WAL, and the space returns to the operating system at once.

Each period is dropped in its own transaction under ``lock_timeout`` (dropping a partition locks
its parent table for an instant) and retried when the table is busy. The locks the drop needs are
taken first, and the period is checked again under them: a transaction still writing into it
when the periods were chosen has ended by then, and its rows are seen (a change it captured at or
after the cut-off keeps the period to the batched purge). When the trail is sealed, the same
transaction appends ``purge`` links to the seal chain naming every sealed transaction the period
held, so ``verify`` reports the purge, not tampering.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
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
    seen: str | None = None
    """The snapshot (``pg_snapshot`` text) the period was checked and counted in: the rows of
    the transactions it did not see are checked and counted again under the drop's locks."""


# the ids of the transactions of a partition that a snapshot does not see (open or not yet begun)
_LATE = (
    "SELECT coalesce(array_agg(id), '{{}}')::bigint[] FROM {t}"
    " WHERE xid >= pg_snapshot_xmin(%(seen)s::pg_snapshot)"
    "   AND NOT pg_visible_in_snapshot(xid, %(seen)s::pg_snapshot)"
)
_BASELINE_TAKEN = (
    "EXISTS (SELECT 1 FROM {a}.baselines b JOIN {t} x ON x.id = b.transaction_id"
    "         WHERE b.finished_at IS NULL AND b.ended_at IS NULL)"
)


def droppable_periods(
    conn: psycopg.Connection[Any], audit_schema: str, cutoff: datetime
) -> list[DroppedPeriod]:
    """The periods that may be dropped for ``cutoff``, oldest first, with their row counts as
    this snapshot sees them (:func:`drop_periods` checks each again under its locks)."""
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
        # one statement, one snapshot: the counts are of what the check saw
        row = conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {c} WHERE captured_at >= %(cutoff)s) OR {baseline},"
                " (SELECT count(*) FROM {t}), (SELECT count(*) FROM {c}), pg_current_snapshot()::text"
            ).format(c=ch_table, t=tx_table, baseline=sql.SQL(_BASELINE_TAKEN).format(a=audit, t=tx_table)),
            {"cutoff": cutoff},
        ).fetchone()
        assert row is not None
        if row[0]:
            _keep(ch_part)
            continue
        out.append(DroppedPeriod(tx_part, ch_part, lo, hi, int(row[1]), int(row[2]), row[3]))
    return out


def _keep(changes_partition: str) -> None:
    logger.info(
        "partition %s holds changes captured after the cut-off (or a baseline being taken):"
        " purged in batches",
        changes_partition,
    )


def _checked_again(
    cur: psycopg.Cursor[Any], audit_schema: str, period: DroppedPeriod, cutoff: datetime
) -> DroppedPeriod | None:
    """Under the drop's locks (no transaction writes into the period any more): ``period`` with
    the rows it holds now, or ``None`` when it may no longer be dropped whole, because a
    transaction its first check did not see (one still open then) captured a change at or after
    ``cutoff``, or a baseline being taken records into it. Only those transactions' rows are
    read, through the indexes, so the locks are held for next to no time."""
    audit = sql.Identifier(audit_schema)
    tx_table = sql.Identifier(audit_schema, period.transactions_partition)
    ch_table = sql.Identifier(audit_schema, period.changes_partition)
    # a period not checked before (no snapshot): every transaction is one it did not see
    seen, before = (period.seen, (period.transactions, period.changes)) if period.seen else ("1:1:", (0, 0))
    late = cur.execute(sql.SQL(_LATE).format(t=tx_table), {"seen": seen}).fetchone()
    ids: list[int] = late[0] if late else []
    row = cur.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {c}"
            "                WHERE transaction_id = ANY (%(ids)s::bigint[]) AND captured_at >= %(cutoff)s)"
            " OR {baseline}, (SELECT count(*) FROM {c} WHERE transaction_id = ANY (%(ids)s::bigint[]))"
        ).format(c=ch_table, baseline=sql.SQL(_BASELINE_TAKEN).format(a=audit, t=tx_table)),
        {"ids": ids, "cutoff": cutoff},
    ).fetchone()
    assert row is not None
    if row[0]:
        _keep(period.changes_partition)
        return None
    return replace(period, transactions=before[0] + len(ids), changes=before[1] + int(row[1]))


def drop_periods(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    periods: list[DroppedPeriod],
    *,
    sealed: bool,
    cutoff: datetime,
    lock_timeout: float = 1.0,
    attempts: int = 10,
) -> list[DroppedPeriod]:
    """Drop each period's two partitions, one period per transaction; returns those dropped, with
    the rows they held.

    Each transaction first takes the locks the drop needs (the writers of the period are over
    then), and checks the period again in a new snapshot: a period that now holds a change
    captured at or after ``cutoff`` (a transaction that was still open when the periods were
    chosen) is left alone, for the batched purge. ``sealed``: record the sealed transactions
    dropped in the seal chain, as a purge up to ``cutoff`` (kept in its links)."""
    done = []
    for period in periods:
        for attempt in range(1, attempts + 1):
            t0 = time.monotonic()
            try:
                dropped = _drop_one(conn, audit_schema, period, sealed, cutoff, lock_timeout)
                break
            except TABLES_BUSY:
                if attempt == attempts:
                    raise
                logger.info(
                    "partition %s is busy, retrying (%d of %d)", period.changes_partition, attempt, attempts
                )
                time.sleep(min(0.1 * 2**attempt, 5.0))
        if dropped is None:
            continue
        seconds = time.monotonic() - t0
        logger.info(
            "dropped partitions %s and %s (%d transactions, %d changes) in %.3f s",
            dropped.transactions_partition,
            dropped.changes_partition,
            dropped.transactions,
            dropped.changes,
            seconds,
        )
        emit(
            "purge.partition",
            partition=dropped.changes_partition,
            transactions=dropped.transactions,
            changes=dropped.changes,
            seconds=seconds,
            audit_schema=audit_schema,
        )
        done.append(dropped)
    return done


def _drop_one(
    conn: psycopg.Connection[Any],
    audit_schema: str,
    period: DroppedPeriod,
    sealed: bool,
    cutoff: datetime,
    lock_timeout: float,
) -> DroppedPeriod | None:
    """One attempt at dropping ``period``, in one transaction: the period as dropped, or ``None``
    when the check under the locks keeps it (nothing changed then)."""
    with conn.transaction() as tx:
        cur = conn.cursor()
        if sealed:
            # before the table locks, to hold them briefly: no seal runs while the chain's lock is
            # held, so a transaction committed after this reads is not sealed and needs no link
            lock_chain(cur, audit_schema)
            _record_in_chain(cur, audit_schema, period.transactions_partition, purge_detail(cutoff))
        cur.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_timeout * 1000)}ms"])
        # the locks DROP TABLE takes, in its order (each parent, then its partition; changes
        # first, as the writers take them): whoever wrote into the period has ended once they are
        # held, and the next statement's snapshot sees what it committed
        cur.execute(
            sql.SQL(
                "LOCK TABLE ONLY {a}.changes, {c}, ONLY {a}.transactions, {t} IN ACCESS EXCLUSIVE MODE"
            ).format(
                a=sql.Identifier(audit_schema),
                c=sql.Identifier(audit_schema, period.changes_partition),
                t=sql.Identifier(audit_schema, period.transactions_partition),
            )
        )
        checked = _checked_again(cur, audit_schema, period, cutoff)
        if checked is None:
            raise psycopg.Rollback(tx)  # nothing changed (nor the chain): let the locks go
        cur.execute(
            sql.SQL("DROP TABLE {}, {}").format(
                sql.Identifier(audit_schema, period.changes_partition),
                sql.Identifier(audit_schema, period.transactions_partition),
            )
        )
    return checked


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
