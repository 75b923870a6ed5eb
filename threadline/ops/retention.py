"""Retention: delete audit rows older than a cut-off, in small batches (or, in a partitioned
store, whole partitions first).

:func:`purge` deletes old ``changes`` rows in batches of ``batch_size``, each batch its own
short transaction (row locks on audit rows only, never a table lock), then the ``transactions``
rows older than the cut-off that are left with no changes, then the ``task_runs`` rows of task
attempts that ended before the cut-off (not when the purge is limited to one table), and last the
entries of ``truncates`` whose change is gone. Interrupting it loses nothing but
time: every committed batch stays done and a rerun continues with what is left.

The cut-off is computed by the database (``now() - older_than``), so the client's clock does
not matter. ``actions`` rows are kept: they are the application's own statements of what
happened, few and small; delete them with SQL if your policy says so.

When the audit trail is sealed (:mod:`threadline.ops.seal`), each batch that deletes sealed rows
appends a link of kind ``purge`` to the seal chain, in the same transaction, recording what it
deleted, so ``verify`` reports the purge rather than tampering.

Progress is logged under the ``threadline.retention`` logger (one DEBUG line per batch, one INFO
line per phase) and emitted as ``purge.batch`` / ``purge.done`` events
(:mod:`threadline.ops.observability`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import pq, sql

from threadline.core._run import run
from threadline.core.errors import RetentionError, TableNotFound
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name
from threadline.ddl.schema import require_installed
from threadline.explore.selection import truncate_change_join
from threadline.explore.tables import TableRef, resolve_table
from threadline.ops.observability import emit
from threadline.ops.partition_migration import refuse_during_migration
from threadline.ops.partition_purge import drop_periods, droppable_periods
from threadline.ops.partitions import is_partitioned
from threadline.ops.retention_counts import purge_counts
from threadline.ops.seal_chain import append_link, chain_head, has_chain, lock_chain, purge_detail

__all__ = ["PurgeResult", "parse_age", "purge"]

logger = logging.getLogger("threadline.retention")

MAX_BATCH_SIZE = 1_000_000
_AGE_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class PurgeResult:
    """What :func:`purge` deleted (or, with ``dry_run``, would delete)."""

    cutoff: datetime
    """Rows captured before this time were purged."""
    changes: int
    transactions: int
    batches: int
    seconds: float
    dry_run: bool
    complete: bool = True
    """False when ``max_batches`` stopped the purge before everything old was deleted."""
    task_runs: int = 0
    """Recorded task attempts that ended before the cut-off."""
    partitions: int = 0
    """Periods of a partitioned store whose partitions were dropped whole (their rows are counted
    in ``changes`` and ``transactions``)."""
    head: str | None = None
    """The seal chain's head after the purge (hex; ``None`` when nothing is sealed): the purge's
    links moved it, so keep this one outside the database in place of the last seal's."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "cutoff": self.cutoff.isoformat(),
            "changes": self.changes,
            "transactions": self.transactions,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "complete": self.complete,
            "task_runs": self.task_runs,
            "partitions": self.partitions,
            "head": self.head,
        }


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` as a :class:`~datetime.timedelta`."""
    match = _AGE_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise RetentionError(f"{text!r} is not an age: write a number and a unit, like 90d, 12h, 30m, 2w")
    return timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


def _cutoff(conn: psycopg.Connection[Any], older_than: timedelta | datetime | str) -> datetime:
    if isinstance(older_than, str):
        older_than = parse_age(older_than)
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None:
            raise RetentionError("older_than: give a timezone-aware datetime (or a timedelta)")
        return older_than
    if not isinstance(older_than, timedelta):
        raise RetentionError(
            f"older_than must be a timedelta, an aware datetime or an age like '90d', not {older_than!r}"
        )
    if older_than < timedelta(0):
        raise RetentionError("older_than must not be negative")
    row = conn.execute("SELECT now() - %s::interval", [older_than]).fetchone()
    assert row is not None
    cutoff: datetime = row[0]
    return cutoff


def _table_filter(conn: psycopg.Connection[Any], table: str | None, audit_schema: str) -> TableRef | None:
    """The table ``table`` names, as the readers find it: every name its changes were recorded
    under (renamed tables), and a dropped table through its audit rows."""
    if table is None:
        return None
    try:
        return run(conn, resolve_table(table, audit_schema))
    except TableNotFound as exc:
        raise RetentionError(str(exc)) from exc


def purge(
    conn: psycopg.Connection[Any],
    older_than: timedelta | datetime | str,
    *,
    batch_size: int = 10_000,
    dry_run: bool = False,
    table: str | None = None,
    audit_schema: str = DEFAULT_SCHEMA,
    max_batches: int | None = None,
    pause: float = 0.0,
) -> PurgeResult:
    """Delete audit changes captured before ``older_than`` ago, then their emptied transactions.

    ``older_than`` is a :class:`~datetime.timedelta`, an age such as ``"90d"``, or an aware
    :class:`~datetime.datetime` cut-off. Each batch of at most ``batch_size`` rows is deleted in
    its own transaction, so ``conn`` must not be inside a transaction. ``table`` (``[schema.]name``)
    limits the purge to that table's changes (transactions still holding other tables' changes
    stay). ``dry_run`` only counts. ``max_batches`` bounds the work of one call; ``pause`` sleeps
    that many seconds between batches to leave room for the application's traffic.

    In a partitioned store (and without ``table``), the periods that lie wholly before the
    cut-off are dropped first, a period's two partitions in one short transaction
    (:mod:`threadline.ops.partition_purge`); only the period the cut-off falls in, and a period
    holding a change captured after the cut-off (by a transaction that ran across it), are
    deleted in batches. ``PurgeResult.partitions`` counts the periods dropped.
    """
    check_schema_name(audit_schema)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise RetentionError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise RetentionError(f"max_batches must be a positive integer, not {max_batches!r}")
    if pause < 0:
        raise RetentionError("pause must not be negative")
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise RetentionError(
            "purge() runs each batch in its own transaction: call it on a connection with no open "
            "transaction (an autocommit connection is simplest)"
        )
    started = time.monotonic()
    try:
        require_installed(conn, audit_schema)
        if not dry_run:
            refuse_during_migration(conn, audit_schema, "purge")
        cutoff = _cutoff(conn, older_than)
        target = _table_filter(conn, table, audit_schema)
        partitioned = is_partitioned(conn, audit_schema)
        periods = [] if target or not partitioned else droppable_periods(conn, audit_schema, cutoff)
    finally:
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.rollback()
    audit = sql.Identifier(audit_schema)
    params: dict[str, Any] = {"cutoff": cutoff}
    # the table under every name it had (each condition binds the same values into params)
    where_table, where_c, where_x = (
        (sql.SQL(" AND ") + target.condition(params, alias) if target else sql.SQL(""))
        for alias in ("changes", "c", "x")
    )
    shown = f" of {target}" if target else ""

    if dry_run:
        changes, transactions, runs = purge_counts(conn, audit, params, where_table, where_c, bool(target))
        elapsed = time.monotonic() - started
        logger.info(
            "dry run: would purge %d changes%s, %d transactions and %d task runs before %s"
            " (%d partitions dropped whole)",
            changes,
            shown,
            transactions,
            runs,
            cutoff.isoformat(),
            len(periods),
        )
        emit(
            "purge.done",
            changes=changes,
            transactions=transactions,
            task_runs=runs,
            batches=0,
            seconds=elapsed,
            dry_run=True,
            audit_schema=audit_schema,
        )
        return PurgeResult(
            cutoff, changes, transactions, 0, elapsed, True, task_runs=runs, partitions=len(periods)
        )

    logger.info(
        "purging changes%s captured before %s in batches of %d", shown, cutoff.isoformat(), batch_size
    )
    batches = 0
    complete = True
    sealed = has_chain(conn, audit_schema)
    totals = {"changes": 0, "transactions": 0, "task runs": 0}
    dropped = drop_periods(conn, audit_schema, periods, sealed=sealed, cutoff=cutoff)
    detail = purge_detail(cutoff, target)  # what each purge link says it did, checked by verify
    totals["changes"] += sum(p.changes for p in dropped)
    totals["transactions"] += sum(p.transactions for p in dropped)
    # partitioned, the bounds on the partition key (a change's transaction started before it was
    # captured) leave the partitions after the cut-off out of every batch
    in_range = sql.SQL(" AND occurred_at < %(cutoff)s" if partitioned else "")
    same_start = sql.SQL(" AND c.occurred_at = t.occurred_at" if partitioned else "")
    statements = {
        # keyset over the primary key (transaction_id, id): each batch starts where the last one
        # ended, and both the walk and the delete are index lookups
        "changes": sql.SQL(
            "WITH batch AS (SELECT transaction_id, id FROM {a}.changes"
            " WHERE (transaction_id, id) > (%(after_tx)s, %(after)s) AND captured_at < %(cutoff)s{r}{w}"
            " ORDER BY transaction_id, id LIMIT %(n)s),"
            " gone AS (DELETE FROM {a}.changes c USING batch b"
            " WHERE c.transaction_id = b.transaction_id AND c.id = b.id{cr} RETURNING c.transaction_id, c.id)"
            " SELECT count(*), (array_agg(transaction_id ORDER BY transaction_id DESC, id DESC))[1],"
            " (array_agg(id ORDER BY transaction_id DESC, id DESC))[1],"
            " (SELECT array_agg(t.id) FROM {a}.transactions t"
            "   WHERE t.id IN (SELECT DISTINCT g.transaction_id FROM gone g)),"
            " (SELECT array_agg(t.xid::text) FROM {a}.transactions t"
            "   WHERE t.id IN (SELECT DISTINCT g.transaction_id FROM gone g)) FROM gone"
        ).format(
            a=audit,
            w=where_table,
            r=in_range,
            cr=sql.SQL(" AND c.occurred_at < %(cutoff)s" if partitioned else ""),
        ),
        "transactions": sql.SQL(
            "WITH batch AS (SELECT t.id FROM {a}.transactions t WHERE t.id > %(after)s"
            " AND t.occurred_at < %(cutoff)s{only}"
            " AND NOT EXISTS (SELECT 1 FROM {a}.changes c WHERE c.transaction_id = t.id{s})"
            " ORDER BY t.id LIMIT %(n)s), gone AS (DELETE FROM {a}.transactions t USING batch b"
            " WHERE t.id = b.id{tr} RETURNING t.id, t.xid) SELECT count(*), NULL::bigint, max(id),"
            " array_agg(id), array_agg(xid::text) FROM gone"
        ).format(
            a=audit,
            s=same_start,
            tr=sql.SQL(" AND t.occurred_at < %(cutoff)s" if partitioned else ""),
            # one table's purge deletes only the transactions it emptied of that table's changes
            only=sql.SQL(" AND t.id = ANY (%(emptied)s::bigint[])" if target else ""),
        ),
    }
    emptied: set[int] = set()
    if not target:
        statements["task runs"] = sql.SQL(
            "WITH batch AS (SELECT r.id FROM {a}.task_runs r WHERE r.id > %(after)s"
            " AND r.ended_at < %(cutoff)s ORDER BY r.id LIMIT %(n)s),"
            " gone AS (DELETE FROM {a}.task_runs r USING batch b WHERE r.id = b.id RETURNING r.id)"
            " SELECT count(*), NULL::bigint, max(id), NULL::bigint[], NULL::text[] FROM gone"
        ).format(a=audit)
    for kind, statement in statements.items():
        after_tx, after = 0, 0
        phase_started = time.monotonic()
        while True:
            if max_batches is not None and batches >= max_batches:
                complete = False
                break
            t0 = time.monotonic()
            with conn.transaction():
                cur = conn.cursor()
                if sealed:
                    lock_chain(cur, audit_schema)  # no seal may read what this batch deletes
                refuse_during_migration(conn, audit_schema, "purge")
                row = cur.execute(
                    statement,
                    {
                        **params,
                        "after_tx": after_tx,
                        "after": after,
                        "n": batch_size,
                        "emptied": sorted(emptied),
                    },
                ).fetchone()
                if target and kind == "changes" and row and row[3]:
                    emptied.update(row[3])
                if sealed and row and row[3]:
                    links = list(zip(row[3], row[4], strict=True))
                    append_link(cur, audit_schema, "purge", links, detail=detail)
            deleted, last_tx, last = (row[0], row[1], row[2]) if row else (0, None, None)
            batches += 1
            totals[kind] += deleted
            seconds = time.monotonic() - t0
            logger.debug("purged %d %s in %.3f s (total %d)", deleted, kind, seconds, totals[kind])
            emit("purge.batch", kind=kind, rows=deleted, seconds=seconds, audit_schema=audit_schema)
            if deleted < batch_size or last is None:
                break
            after_tx, after = last_tx or 0, last
            if pause:
                time.sleep(pause)
        logger.info(
            "purged %d %s%s in %.1f s",
            totals[kind],
            kind,
            shown if kind == "changes" else "",
            time.monotonic() - phase_started,
        )
        if not complete:
            logger.info("stopped after max_batches=%d; run purge again to continue", max_batches)
            break
    _forget_purged_truncates(conn, audit, partitioned, where_x, params)
    head = None
    if sealed:
        with conn.transaction():
            head = chain_head(conn.cursor(), audit_schema, "purge")
    elapsed = time.monotonic() - started
    emit(
        "purge.done",
        changes=totals["changes"],
        transactions=totals["transactions"],
        task_runs=totals["task runs"],
        batches=batches,
        seconds=elapsed,
        dry_run=False,
        audit_schema=audit_schema,
    )
    return PurgeResult(
        cutoff,
        totals["changes"],
        totals["transactions"],
        batches,
        elapsed,
        False,
        complete,
        task_runs=totals["task runs"],
        partitions=len(dropped),
        head=head,
    )


def _forget_purged_truncates(
    conn: psycopg.Connection[Any],
    audit: sql.Identifier,
    partitioned: bool,
    where_table: sql.Composable,
    params: dict[str, Any],
) -> None:
    """Delete the entries of ``truncates`` whose change is gone (readers join each entry to its
    change, so a leftover entry only takes space); the table holds one row per truncate."""
    with conn.transaction():
        deleted = conn.execute(
            sql.SQL(
                "DELETE FROM {a}.truncates x WHERE x.captured_at < %(cutoff)s{w}"
                " AND NOT EXISTS (SELECT FROM {a}.changes c WHERE {j})"
            ).format(a=audit, w=where_table, j=truncate_change_join(partitioned)),
            params,
        ).rowcount
    logger.debug("forgot %d truncates whose changes were purged", deleted)
