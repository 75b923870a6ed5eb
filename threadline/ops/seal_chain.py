"""The seal chain's writers: the lock they share, and the links an erasure or a purge appends
(:mod:`threadline.ops.seal` has the seals themselves and their verification)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from threadline.ddl.names import check_schema_name
from threadline.explore.tables import TableRef

__all__ = [
    "DELETED",
    "DIGEST_SIZE",
    "append_link",
    "chain_head",
    "has_chain",
    "lock_chain",
    "purge_detail",
    "unsalted",
]

logger = logging.getLogger("threadline.seal")

DIGEST_SIZE = 32
"""Bytes of one transaction's digest in a link."""
DELETED = bytes(DIGEST_SIZE)
"""The digest a purge link records for a sealed transaction it deleted."""


def audit_identifier(audit_schema: str) -> sql.Identifier:
    """The audit schema's name, checked, as an identifier."""
    check_schema_name(audit_schema)
    return sql.Identifier(audit_schema)


def has_chain(conn: psycopg.Connection[Any], audit_schema: str) -> bool:
    """Whether the schema has a seal chain (version 7 and later), so purges are recorded in it."""
    with conn.transaction():
        row = conn.execute("SELECT to_regclass(format('%%I.seals', %s::text))", [audit_schema]).fetchone()
    return bool(row and row[0])


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
    detail: str | None = None,
) -> int:
    """Append a link of ``kind`` recording the digests, as they are now, of those of
    ``transactions`` (``(id, xid)`` pairs) that the chain covers; :data:`DELETED` for one no longer
    there. ``detail`` (a purge's :func:`purge_detail`) is kept in the link and its hash. Returns
    how many it recorded (none: no link). The caller holds :func:`lock_chain`.

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
            "                        hash, action_id, detail)"
            " SELECT %(kind)s, 2, prev.last_xid, prev.last_id, d.ids, d.digests, 0, prev.hash,"
            "        {a}.seal_hash(%(kind)s, 2, prev.hash, prev.last_xid, prev.last_id, d.ids, d.digests,"
            "                      %(action)s, %(detail)s::text, NULL),"
            "        %(action)s, %(detail)s::text"
            "   FROM prev, d WHERE d.ids IS NOT NULL"
            " RETURNING cardinality(transaction_ids)"
        ).format(a=audit),
        {
            "ids": ids,
            "xids": [str(t[1]) for t in transactions],
            "deleted": DELETED,
            "kind": kind,
            "action": action_id,
            "detail": detail,
        },
    ).fetchone()
    return 0 if row is None else int(row[0])


def purge_detail(cutoff: datetime, table: TableRef | None = None) -> str:
    """What a purge link says it did, as the JSON text it keeps (in its hash): the cut-off, in UTC,
    and the table it was limited to, if it was, under every name it had (``schema.name``)."""
    tables = None if table is None else sorted({f"{n[0]}.{n[1]}" for n in table.names} or {str(table)})
    return json.dumps(
        {"cutoff": cutoff.astimezone(timezone.utc).isoformat(), "tables": tables}, sort_keys=True
    )


def chain_head(cur: psycopg.Cursor[Any], audit_schema: str, after: str | None = None) -> str | None:
    """The hash at the head of the seal chain (hex; ``None`` before the first seal). ``after``
    names what just appended links (an erasure, a purge): the new head is logged with it at INFO,
    as :func:`seal` logs its own, so it can be kept outside the database."""
    row = cur.connection.execute(
        sql.SQL("SELECT encode(hash, 'hex') FROM {}.seals ORDER BY id DESC LIMIT 1").format(
            audit_identifier(audit_schema)
        )
    ).fetchone()
    head = None if row is None else str(row[0])
    if after is not None and head is not None:
        logger.info("%s recorded in the seal chain; head %s", after, head)
    return head


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
