"""Verification of the seal chain: :func:`verify` (re-exported by :mod:`threadline.ops.seal`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from threadline.ddl.names import DEFAULT_SCHEMA
from threadline.ops.seal_chain import DELETED, DIGEST_SIZE, audit_identifier

__all__ = ["VerifyResult", "verify"]


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
    after_head: list[str] = field(default_factory=list)
    """When the head given (``expect_head``) is an earlier link of the chain: the erasures and
    purges recorded after it (when, what, how many transactions) and a count of the seals, in
    words. The chain must still end with the head given to be ``ok``."""

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
        lines = [f"TAMPERED: {p}" for p in self.problems]
        if self.after_head:
            lines.append("recorded after the head kept outside the database:")
            lines += [f"  {entry}" for entry in self.after_head]
        return "\n".join(lines)


def verify(
    conn: psycopg.Connection[Any], *, expect_head: str | None = None, audit_schema: str = DEFAULT_SCHEMA
) -> VerifyResult:
    """Recompute the chain of seals and the digest of every sealed transaction.

    ``expect_head``: the head hash kept outside the database; a chain that does not end with it
    was cut (its latest seals removed) or replaced.
    """
    audit = audit_identifier(audit_schema)
    # binary results: times read whatever the session's DateStyle
    cur = conn.cursor(row_factory=dict_row, binary=True)
    columns = sql.SQL(
        "SELECT s.id, s.kind, s.last_xid::text AS last_xid, s.last_id, s.transaction_ids, s.digests,"
        " s.prev_hash, s.hash, s.action_id, s.format, s.detail, s.started, s.sealed_at,"
        " s.hash = {a}.seal_hash(s.kind, s.format, s.prev_hash, s.last_xid, s.last_id, s.transaction_ids,"
        " s.digests, s.action_id, s.detail, s.started) AS intact"
        "  FROM {a}.seals s"
    ).format(a=audit)
    # the latest digest an erasure or a purge recorded for each sealed transaction it changed
    recorded: dict[int, tuple[bytes, str, int]] = {}
    # the cut-off of each purge link that says it removed (some of) a transaction
    claims: dict[int, list[tuple[int, datetime]]] = {}
    problems: list[str] = []
    for link in cur.execute(sql.SQL("{} WHERE s.kind <> 'seal' ORDER BY s.id").format(columns)).fetchall():
        if link["kind"] == "purge" and link["format"] >= 2:
            cutoff = _cutoff(link)
            if cutoff is None:
                problems.append(f"purge link {link['id']} does not say what it purged (no cut-off)")
            else:
                for tx in link["transaction_ids"]:
                    claims.setdefault(tx, []).append((link["id"], cutoff))
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

    named: int | None = None
    newest_format = 0
    after: list[dict[str, Any]] | None = None
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
        if link["format"] < newest_format:
            problems.append(
                f"{link['kind']} link {link['id']} is of format {link['format']} after links of format"
                f" {newest_format}: this release never writes one, it was made by hand"
            )
        newest_format = max(newest_format, link["format"])
        if after is not None:
            after.append(link)
        elif expect_head is not None and bytes(link["hash"]).hex() == expect_head.lower():
            after = []
        prev_hash = bytes(link["hash"])
        if link["kind"] != "seal":
            continue
        for i, tx in enumerate(link["transaction_ids"] if link["started"] is not None else ()):
            for purge_id, cutoff in claims.get(tx, ()):
                if link["started"][i] >= cutoff:
                    problems.append(
                        f"purge link {purge_id} says it removed transaction {tx}, which started at"
                        f" {link['started'][i].isoformat()}, not before its cut-off {cutoff.isoformat()}:"
                        " the link was made by hand"
                    )
                    named = tx if named is None else named
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
        after_head=_summaries(after) if head != (expect_head or "").lower() else [],
    )


def _cutoff(link: dict[str, Any]) -> datetime | None:
    """The cut-off a purge link of format 2 records (``None``: it records none)."""
    try:
        return datetime.fromisoformat(json.loads(link["detail"])["cutoff"])
    except (TypeError, ValueError, KeyError):
        return None


def _summaries(links: list[dict[str, Any]] | None) -> list[str]:
    """The erasures and purges among ``links``, one line each (the consecutive links of one purge
    run together), and how many seals came with them."""
    groups: list[list[dict[str, Any]]] = []
    seals = sealed = 0
    for link in links or ():
        if link["kind"] == "seal":
            seals, sealed = seals + 1, sealed + len(link["transaction_ids"])
        elif (
            groups
            and link["kind"] == "purge"
            and (groups[-1][-1]["kind"], groups[-1][-1]["detail"])
            == (
                "purge",
                link["detail"],
            )
        ):
            groups[-1].append(link)
        else:
            groups.append([link])
    out = []
    for group in groups:
        first, count = group[0], len({tx for link in group for tx in link["transaction_ids"]})
        ids = f"link {first['id']}" if len(group) == 1 else f"links {first['id']}-{group[-1]['id']}"
        what = f"{ids}: {first['kind']} at {first['sealed_at'].isoformat(timespec='seconds')}, {count} sealed transaction(s)"
        if first["kind"] == "erasure" and first["action_id"] is not None:
            what += f", recorded as action {first['action_id']}"
        if first["kind"] == "purge" and first["detail"]:
            detail = json.loads(first["detail"])
            what += f", cut-off {detail.get('cutoff')}"
            what += f", tables {', '.join(detail['tables'])}" if detail.get("tables") else ""
        out.append(what)
    if seals:
        out.append(f"{seals} seal(s) of {sealed} transaction(s)")
    return out


def _salted(
    cur: psycopg.Cursor[dict[str, Any]], audit: sql.Identifier, digests: dict[int, bytes]
) -> dict[int, bytes]:
    """The salted digest (format 2) of each of ``digests`` (transaction id -> digest) that has a
    salt, through ``salted_digests()`` (the salts stay unreadable to the caller)."""
    if not digests:
        return {}
    rows = cur.execute(
        sql.SQL("SELECT id, digest FROM {}.salted_digests(%s::bigint[], %b::bytea[])").format(audit),
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
