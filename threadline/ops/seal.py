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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.rows import dict_row

from threadline.core.errors import ConfigurationError
from threadline.ddl.names import DEFAULT_SCHEMA, check_schema_name

__all__ = ["SealResult", "VerifyResult", "seal", "unsalted", "verify"]

logger = logging.getLogger("threadline.seal")

DIGEST_SIZE = 32
DELETED = bytes(DIGEST_SIZE)
"""The digest a purge link records for a sealed transaction it deleted."""


@dataclass(frozen=True)
class SealResult:
    """What one :func:`seal` run did."""

    seals: int
    """Seals written by this run."""
    transactions: int
    """Transactions they cover."""
    head: str | None
    """The hash at the head of the chain (hex): keep it outside the database."""


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found."""

    ok: bool
    seals: int
    """Links of the chain checked (seals, erasures and purges)."""
    transactions: int
    """Sealed transactions checked."""
    erased: int
    """Sealed transactions rewritten by a recorded erasure (not a problem)."""
    head: str | None
    """The hash at the head of the chain (hex)."""
    first_problem: str | None = None
    """The first problem in chain order, in words; ``None`` when ``ok``."""
    problem_transaction: int | None = None
    """The transaction it names, if it names one."""
    problems: list[str] = field(default_factory=list)
    """Every problem found, in chain order."""
    purged: int = 0
    """Sealed transactions deleted, or whose old changes were deleted, by a recorded purge (not a
    problem)."""

    def render(self) -> str:
        """``ok: ...`` or the problems, one per line."""
        if self.ok:
            notes = [f"{self.erased} rewritten by recorded erasures"] if self.erased else []
            notes += [f"{self.purged} removed by recorded purges"] if self.purged else []
            return (
                f"ok: {self.transactions} sealed transactions in {self.seals} links match"
                + (f" ({', '.join(notes)})" if notes else "")
                + (f"; head {self.head}" if self.head else "; nothing is sealed yet (threadline seal)")
            )
        return "\n".join(f"TAMPERED: {p}" for p in self.problems)


def audit_identifier(audit_schema: str) -> sql.Identifier:
    check_schema_name(audit_schema)
    return sql.Identifier(audit_schema)


def lock_chain(cur: psycopg.Cursor[Any], audit_schema: str) -> None:
    """Wait for, then hold until the transaction ends, the lock of the seal chain's writers: a
    seal, an erasure, a purge batch. Take it before reading what the chain covers."""
    check_schema_name(audit_schema)
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"threadline seal {audit_schema}"])


def append_link(
    cur: psycopg.Cursor[Any],
    audit_schema: str,
    kind: str,
    transactions: list[tuple[int, str]],
    action_id: int | None = None,
) -> int:
    """Append a link of ``kind`` recording the digests, as they are now, of those of
    ``transactions`` (``(id, xid)`` pairs) that the chain covers; :data:`DELETED` for one no longer
    there. Returns how many it recorded (none: no link). The caller holds :func:`lock_chain`.

    The salts of all of ``transactions`` are deleted first, so the digests recorded before (of the
    values rewritten or removed) can no longer be tested against guesses; each one still there gets
    a new salt, for the new digest recorded."""
    if not transactions:
        return 0
    audit = audit_identifier(audit_schema)
    ids = [t[0] for t in transactions]
    cur.connection.execute(
        sql.SQL("DELETE FROM {}.seal_salts WHERE transaction_id = ANY (%s)").format(audit), [ids]
    )
    row = cur.connection.execute(
        sql.SQL(
            "WITH prev AS (SELECT * FROM {a}.seals ORDER BY id DESC LIMIT 1),"
            " covered AS (SELECT DISTINCT u.i FROM unnest(%(ids)s::bigint[], %(xids)s::text[]) AS u(i, x), prev"
            "              WHERE (u.x::xid8, u.i) <= (prev.last_xid, prev.last_id)),"
            " fresh AS (SELECT f.id, f.digest FROM {a}.new_salts(ARRAY(SELECT c.i FROM covered c)) AS f),"
            " d AS (SELECT array_agg(c.i ORDER BY c.i) AS ids,"
            "              string_agg(coalesce(f.digest, %(deleted)s), ''::bytea ORDER BY c.i) AS digests"
            "         FROM covered c LEFT JOIN fresh f ON f.id = c.i)"
            " INSERT INTO {a}.seals (kind, format, last_xid, last_id, transaction_ids, digests, changes, prev_hash,"
            "                        hash, action_id)"
            " SELECT %(kind)s, 2, prev.last_xid, prev.last_id, d.ids, d.digests, 0, prev.hash,"
            "        {a}.seal_hash(%(kind)s, 2, prev.hash, prev.last_xid, prev.last_id, d.ids, d.digests,"
            "                      %(action)s, NULL),"
            "        %(action)s"
            "   FROM prev, d WHERE d.ids IS NOT NULL"
            " RETURNING cardinality(transaction_ids)"
        ).format(a=audit),
        {
            "ids": ids,
            "xids": [str(t[1]) for t in transactions],
            "deleted": DELETED,
            "kind": kind,
            "action": action_id,
        },
    ).fetchone()
    return 0 if row is None else int(row[0])


def unsalted(cur: psycopg.Cursor[Any], audit_schema: str, transaction_ids: list[int]) -> int:
    """How many of ``transaction_ids`` have a digest recorded by a link of format 1 (made before
    seals were salted): an erasure cannot hide those digests, which stay testable against guesses
    of the values erased. Logs a warning naming the count when there are any."""
    if not transaction_ids:
        return 0
    row = cur.connection.execute(
        sql.SQL(
            "SELECT count(DISTINCT x.tx) FROM {}.seals s, unnest(s.transaction_ids) AS x(tx)"
            " WHERE s.format = 1 AND x.tx = ANY (%s)"
        ).format(audit_identifier(audit_schema)),
        [transaction_ids],
    ).fetchone()
    exposed = 0 if row is None else int(row[0])
    if exposed:
        logger.warning(
            "%d of the transactions erased were sealed before seals were salted (format 1): their old"
            " digests stay in the seal chain, and a low-entropy erased value (an id, a short code) can"
            " be recovered from them by trying guesses",
            exposed,
        )
    return exposed


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
    return SealResult(seals, transactions, head)


def verify(
    conn: psycopg.Connection[Any], *, expect_head: str | None = None, audit_schema: str = DEFAULT_SCHEMA
) -> VerifyResult:
    """Recompute the chain of seals and the digest of every sealed transaction.

    ``expect_head``: the head hash kept outside the database; a chain that does not end with it
    was cut (its latest seals removed) or replaced.
    """
    audit = audit_identifier(audit_schema)
    cur = conn.cursor(row_factory=dict_row)
    columns = sql.SQL(
        "SELECT s.id, s.kind, s.last_xid::text AS last_xid, s.last_id, s.transaction_ids, s.digests,"
        " s.prev_hash, s.hash, s.action_id, s.format,"
        " s.hash = {a}.seal_hash(s.kind, s.format, s.prev_hash, s.last_xid, s.last_id, s.transaction_ids,"
        " s.digests, s.action_id, s.detail) AS intact"
        "  FROM {a}.seals s"
    ).format(a=audit)
    # the latest digest an erasure or a purge recorded for each sealed transaction it changed
    recorded: dict[int, tuple[bytes, str, int]] = {}
    for link in cur.execute(sql.SQL("{} WHERE s.kind <> 'seal' ORDER BY s.id").format(columns)).fetchall():
        for i, tx in enumerate(link["transaction_ids"]):
            recorded[tx] = (
                bytes(link["digests"][i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]),
                link["kind"],
                link["format"],
            )
    page = sql.SQL("{} WHERE s.id > %s ORDER BY s.id LIMIT 100").format(columns)

    def chain() -> Iterator[dict[str, Any]]:
        """Every link in order, a page at a time (memory stays flat however long the chain)."""
        last = 0
        while rows := cur.execute(page, [last]).fetchall():
            yield from rows
            last = rows[-1]["id"]

    problems: list[str] = []
    named: int | None = None
    prev_hash: bytes | None = None
    prev_pos: tuple[str | None, int | None] = (None, None)
    checked = rewritten = purged = links = 0
    for link in chain():
        links += 1
        if (None if link["prev_hash"] is None else bytes(link["prev_hash"])) != prev_hash:
            problems.append(
                f"seal {link['id']} does not follow the link before it: a seal was removed or replaced"
            )
        if not link["intact"]:
            problems.append(f"seal {link['id']} was changed (its contents no longer give its hash)")
        prev_hash = bytes(link["hash"])
        if link["kind"] != "seal":
            continue
        sealed_ids: list[int] = list(link["transaction_ids"])
        stored = {
            tx: bytes(link["digests"][i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
            for i, tx in enumerate(sealed_ids)
        }
        now = cur.execute(
            sql.SQL("SELECT id, digest FROM {}.range_digests(%s::xid8, %s, %s::xid8, %s)").format(audit),
            [prev_pos[0], prev_pos[1], link["last_xid"], link["last_id"]],
        ).fetchall()
        current = {r["id"]: bytes(r["digest"]) for r in now}
        salted = _salted(cur, audit, current)
        for tx in sealed_ids:
            checked += 1
            # as the link that recorded it computed it: format 1 plain, format 2 salted
            digest = {1: current.get(tx), 2: salted.get(tx)}
            if digest[link["format"]] == stored[tx]:
                continue
            known = recorded.get(tx)
            if tx not in current:
                expected: bytes | None = DELETED
            else:
                expected = None if known is None else digest[known[2]]
            if known is not None and known[0] == expected:
                if known[1] == "erasure":
                    rewritten += 1
                else:
                    purged += 1
                continue
            if tx not in current:
                problems.append(f"transaction {tx} (sealed by seal {link['id']}) was deleted")
            elif digest[2] is None and (link["format"] == 2 or known is not None):
                problems.append(
                    f"transaction {tx} (sealed by seal {link['id']}) has lost its salt, and no recorded"
                    " erasure or purge accounts for it: its seal can no longer be checked"
                )
            else:
                problems.append(
                    f"transaction {tx} (sealed by seal {link['id']}) no longer matches: its row or its changes were changed"
                )
            named = tx if named is None else named
        for tx in current:
            if tx not in stored:
                problems.append(f"transaction {tx} was inserted into the range sealed by seal {link['id']}")
                named = tx if named is None else named
        prev_pos = (link["last_xid"], link["last_id"])
    if prev_pos[0] is not None:
        for stray in _stray_changes(cur, audit, prev_pos):
            if stray["orphan"]:
                problems.append(
                    f"change {stray['id']} names transaction {stray['transaction_id']}, which does not exist:"
                    " it was inserted by hand, or its transaction was deleted"
                )
            else:
                problems.append(
                    f"change {stray['id']} names sealed transaction {stray['transaction_id']} without its"
                    " start time: it was inserted or moved by hand"
                )
            named = stray["transaction_id"] if named is None else named
    head = None if prev_hash is None else prev_hash.hex()
    if expect_head is not None and expect_head.lower() != head:
        problems.append(
            f"the chain ends with {head or 'no seal'}, not with the head hash kept outside the database "
            f"({expect_head}): seals were removed or the chain was replaced"
        )
    return VerifyResult(
        ok=not problems,
        seals=links,
        transactions=checked,
        erased=rewritten,
        head=head,
        first_problem=problems[0] if problems else None,
        problem_transaction=named,
        problems=problems,
        purged=purged,
    )


def _salted(
    cur: psycopg.Cursor[dict[str, Any]], audit: sql.Identifier, digests: dict[int, bytes]
) -> dict[int, bytes]:
    """The salted digest (format 2) of each of ``digests`` (transaction id -> digest) that has a
    salt, through ``salted_digests()`` (the salts stay unreadable to the caller)."""
    if not digests:
        return {}
    rows = cur.execute(
        sql.SQL("SELECT id, digest FROM {}.salted_digests(%s::bigint[], %s::bytea[])").format(audit),
        [list(digests), list(digests.values())],
    ).fetchall()
    return {r["id"]: bytes(r["digest"]) for r in rows}


def _stray_changes(
    cur: psycopg.Cursor[dict[str, Any]], audit: sql.Identifier, upto: tuple[str | None, int | None]
) -> list[dict[str, Any]]:
    """Changes that no transaction's digest reads: those whose transaction does not exist
    (``orphan``; capture writes a transaction's row before its changes, and purges delete changes
    first), and, in a partitioned store, those of sealed transactions that do not carry their
    transaction's start time (a transaction's digest reads its changes in its own partition only,
    so such a row, which capture never writes, would otherwise escape it)."""
    partitioned = cur.execute(
        sql.SQL("SELECT c.relkind = 'p' AS p FROM pg_class c WHERE c.oid = {}::regclass").format(
            sql.Literal(f"{audit.as_string(None)}.changes")
        )
    ).fetchone()
    if not partitioned or not partitioned["p"]:
        # one hash anti join over both tables
        return cur.execute(
            sql.SQL(
                "SELECT c.id, c.transaction_id, true AS orphan FROM {a}.changes c"
                " WHERE NOT EXISTS (SELECT 1 FROM {a}.transactions t WHERE t.id = c.transaction_id)"
                " ORDER BY c.id LIMIT 10"
            ).format(a=audit)
        ).fetchall()
    return cur.execute(
        sql.SQL(
            # hash anti joins over both tables (a lookup per change would search every partition)
            "SELECT c.id, c.transaction_id, NOT EXISTS (SELECT 1 FROM {a}.transactions t"
            "                                            WHERE t.id = c.transaction_id) AS orphan"
            "  FROM {a}.changes c"
            " WHERE NOT EXISTS (SELECT 1 FROM {a}.transactions t"
            "                    WHERE t.id = c.transaction_id AND t.occurred_at = c.occurred_at)"
            "   AND (NOT EXISTS (SELECT 1 FROM {a}.transactions t WHERE t.id = c.transaction_id)"
            "        OR EXISTS (SELECT 1 FROM {a}.transactions t"
            "                    WHERE t.id = c.transaction_id AND (t.xid, t.id) <= (%s::xid8, %s)))"
            " ORDER BY c.id LIMIT 10"
        ).format(a=audit),
        list(upto),
    ).fetchall()
