"""Complete paging of the audit trail while other transactions are still writing.

Changes are ordered by ``(captured_at, id)``, but ``captured_at`` is the time of the write, not of
the commit: a transaction that writes early and commits late puts rows *behind* a reader that has
already paged past that time. Paging by position alone would never return them.

So a cursor holds the position it has reached and the transactions whose rows that read could
not see, as PostgreSQL's snapshot names them: the ones in its in-progress list (``xip``), and
every transaction id at or above its ``xmax`` (PostgreSQL sets ``xmax`` just above the latest
*completed* transaction, so a transaction that was already writing can sit above it without being
listed). The next page first returns the rows of those transactions that have committed since and
lie at or before the position ("late" rows, in transaction order), then continues from the
position. Every committed change is returned exactly once, whatever the interleaving of writers
and readers; late rows arrive at the start of a later page rather than in capture order.

A transaction is watched only while it is in progress, or committed with late rows not yet
returned, so a cursor stays small: one number per transaction running when it was issued.

The page is read by one statement, so the rows, the position and the snapshot that says which
transactions were still running all come from the same snapshot.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from psycopg import sql

from threadline.core.errors import InvalidCursor
from threadline.core.records import iso

__all__ = [
    "CLOSING",
    "FORWARD",
    "KEY_COLUMNS",
    "LATE",
    "MAX_CURSOR_LENGTH",
    "SAME_SNAPSHOT",
    "START",
    "Position",
    "Reader",
    "Snapshot",
    "Watched",
    "decode",
    "encode",
    "forward_statement",
    "page_statement",
    "parse_snapshot",
]

MAX_CURSOR_LENGTH = 262_144
"""Longest cursor accepted (a cursor grows by about 12 characters per transaction in progress)."""

_XID_MAX = 2**63 - 1


@dataclass(frozen=True)
class Watched:
    """A transaction that was in progress when a cursor was issued, or one whose late rows are
    being returned: rows after ``(transaction_id, change_id)`` are still to come."""

    xid: int
    transaction_id: int = 0
    change_id: int = 0


@dataclass(frozen=True)
class Position:
    """Where a reader is: every committed change at or before ``(at, id)`` has been returned,
    except those of the ``watched`` transactions, and those of transactions with an id at or
    above ``above`` whose ``(xid, transaction_id, change_id)`` comes after ``above_done``."""

    at: datetime | None = None
    id: int | None = None
    watched: tuple[Watched, ...] = ()
    above: int | None = None
    above_done: Watched = Watched(0)


START = Position()
"""The position before the first change."""


def encode(position: Position, fingerprint: str) -> str:
    """Opaque cursor for ``position``, bound to the query filters' ``fingerprint``."""
    watched: list[Any] = [
        w.xid if (w.transaction_id, w.change_id) == (0, 0) else [w.xid, w.transaction_id, w.change_id]
        for w in position.watched
    ]
    done = position.above_done
    payload = {
        "v": 2,
        "at": None if position.at is None else iso(position.at),
        "id": position.id,
        "w": watched,
        "x": position.above,
        "k": [done.xid, done.transaction_id, done.change_id],
        "q": fingerprint,
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _int(value: Any, maximum: int = _XID_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError("not a non-negative integer")
    return value


def _watched(item: Any) -> Watched:
    if isinstance(item, list) and len(item) == 3:
        return Watched(_int(item[0]), _int(item[1]), _int(item[2]))
    return Watched(_int(item))


def decode(cursor: Any, fingerprint: str) -> Position:
    """The :class:`Position` of a cursor from :func:`encode`; raises :class:`InvalidCursor` for
    anything else, or for a cursor issued for other filters. Cursors of the first format (a
    position without watched transactions) are still read."""
    invalid = InvalidCursor("the cursor is not one returned by timeline() or export()")
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_LENGTH:
        raise invalid
    try:
        payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(payload, dict) or payload.get("v") not in (1, 2):
            raise ValueError("unknown cursor version")
        at_text, ident = payload["at"], payload["id"]
        if (at_text is None) != (ident is None) or (payload["v"] == 1 and at_text is None):
            raise ValueError("position is incomplete")
        at = None
        if at_text is not None:
            at = datetime.strptime(at_text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
            ident = _int(ident)
        items = payload.get("w", []) if payload["v"] == 2 else []
        if not isinstance(items, list):
            raise ValueError("watched transactions are not a list")
        watched = tuple(sorted({w.xid: w for w in map(_watched, items)}.values(), key=lambda w: w.xid))
        above = payload.get("x")
        above = None if above is None else _int(above)
        done = payload.get("k", [0, 0, 0])
        if not isinstance(done, list) or len(done) != 3:
            raise ValueError("range progress is not three numbers")
        above_done = _watched(done)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise invalid from None
    if payload.get("q") != fingerprint:
        raise InvalidCursor(
            "the cursor belongs to a query with other filters (correlation id, table, actor or op)"
        )
    return Position(at, ident, watched, above, above_done)


# ---------------------------------------------------------------------------------------------
# The page statement

KEY_COLUMNS = ("phase", "k_xid", "k_tid", "k_at", "k_id", "k_xip")
"""Columns every row of a page statement starts with: the phase (0 late, 1 in position order,
2 the closing row that carries the snapshot's in-progress transactions) and the row's keys."""

LATE, FORWARD, CLOSING = 0, 1, 2

_NOTHING = sql.SQL("")


PLAIN_JOIN = sql.SQL("t.id = c.transaction_id")
"""How a change ``c`` joins its transaction ``t`` in a store that is not partitioned."""


def page_statement(
    audit: sql.Identifier,
    columns: sql.Composable,
    names: Sequence[str],
    where: Any,
    position: Position,
    limit: int | None,
    params: dict[str, Any],
    lateral: sql.Composable = _NOTHING,
    *,
    forward_keys: bool = True,
    forward: bool = True,
    tx_join: sql.Composable = PLAIN_JOIN,
    forward_join: bool = True,
) -> sql.Composed:
    """One statement returning a page's late rows, then its rows in position order, then the
    closing row, each row led by :data:`KEY_COLUMNS` and followed by ``columns``.

    ``columns`` (named ``names``) read ``changes c`` and ``transactions t`` and ``lateral``'s
    aliases; ``where(params, extra)`` builds the filters' ``WHERE`` clause; each part reads at
    most ``limit + 1`` rows. Without ``forward_keys`` the rows in position order carry no
    ``k_at``/``k_id`` (the caller reads the last one's position from its own columns): a large
    export then loads two values fewer per row. Without ``forward`` the statement returns only
    the late rows and the closing row: the rows in position order then come from
    :func:`forward_statement`, run in the same snapshot (a ``REPEATABLE READ`` transaction).
    ``tx_join`` joins ``c`` to ``t`` (:func:`threadline.explore.selection.transaction_join`); without
    ``forward_join`` the rows in position order are read from ``changes`` alone (neither the
    filters nor ``columns`` read ``t``).
    """
    # Each part is ordered (and cut) only when the page has a limit; otherwise the one sort of
    # the whole statement orders every row, and sorting each part first would do it twice.
    late_cap = forward_cap = sql.SQL("")
    if limit is not None:
        params["page_limit"] = limit + 1
        late_cap = sql.SQL(" ORDER BY t.xid, c.transaction_id, c.id LIMIT %(page_limit)s")
        forward_cap = sql.SQL(" ORDER BY c.captured_at, c.id LIMIT %(page_limit)s")
    late = sql.SQL(
        "(SELECT 0 AS phase, t.xid::text::bigint AS k_xid, c.transaction_id AS k_tid,"
        " NULL::timestamptz AS k_at, c.id AS k_id, NULL::text AS k_xip,"
        " NULL::timestamptz AS s_at, c.id AS s_id, {columns}"
        " FROM {audit}.changes c JOIN {audit}.transactions t ON {tx_join}{join}{lateral}{where}"
        "{cap})"
    )
    parts: list[sql.Composable] = []
    if position.at is not None:
        params["p_at"], params["p_id"] = position.at, position.id
        params["w_xid"] = [str(w.xid) for w in position.watched]
        before = sql.SQL("c.captured_at <= %(p_at)s AND (c.captured_at, c.id) <= (%(p_at)s, %(p_id)s)")
        if position.watched:
            params["w_tid"] = [w.transaction_id for w in position.watched]
            params["w_cid"] = [w.change_id for w in position.watched]
            join = sql.SQL(
                " JOIN unnest(%(w_xid)s::text[]::xid8[], %(w_tid)s::bigint[], %(w_cid)s::bigint[])"
                " AS w(xid, tid, cid) ON t.xid = w.xid"
            )
            cond = where(params, [sql.SQL("(c.transaction_id, c.id) > (w.tid, w.cid)"), before])
            parts.append(
                late.format(
                    columns=columns,
                    audit=audit,
                    tx_join=tx_join,
                    join=join,
                    lateral=lateral,
                    where=cond,
                    cap=late_cap,
                )
            )
        if position.above is not None:
            done = position.above_done
            params["above"], params["done_xid"] = str(position.above), str(done.xid)
            params["done_tid"], params["done_cid"] = done.transaction_id, done.change_id
            cond = where(
                params,
                [
                    sql.SQL(
                        "t.xid >= %(above)s::xid8 AND t.xid <> ALL (%(w_xid)s::text[]::xid8[])"
                        " AND (t.xid, c.transaction_id, c.id) > (%(done_xid)s::xid8, %(done_tid)s, %(done_cid)s)"
                    ),
                    before,
                ],
            )
            parts.append(
                late.format(
                    columns=columns,
                    audit=audit,
                    tx_join=tx_join,
                    join=_NOTHING,
                    lateral=lateral,
                    where=cond,
                    cap=late_cap,
                )
            )
    extra: list[sql.Composable] = []
    if position.at is not None:
        params["f_at"], params["f_id"] = position.at, position.id
        extra.append(sql.SQL("c.captured_at >= %(f_at)s AND (c.captured_at, c.id) > (%(f_at)s, %(f_id)s)"))
    keys = (
        sql.SQL("c.captured_at" if forward_keys else "NULL::timestamptz"),
        sql.SQL("c.id" if forward_keys else "NULL::bigint"),
    )
    if forward:
        parts.append(
            sql.SQL(
                "(SELECT 1 AS phase, NULL::bigint AS k_xid, NULL::bigint AS k_tid, {k_at} AS k_at,"
                " {k_id} AS k_id, NULL::text AS k_xip, c.captured_at AS s_at, c.id AS s_id, {columns}"
                " FROM {audit}.changes c{t_join}"
                "{lateral}{where}{cap})"
            ).format(
                k_at=keys[0],
                k_id=keys[1],
                columns=columns,
                audit=audit,
                t_join=sql.SQL(" LEFT JOIN {audit}.transactions t ON {tx_join}").format(
                    audit=audit, tx_join=tx_join
                )
                if forward_join
                else _NOTHING,
                lateral=lateral,
                where=where(params, extra),
                cap=forward_cap,
            )
        )
    parts.append(
        sql.SQL(
            "(SELECT 2 AS phase, NULL::bigint AS k_xid, NULL::bigint AS k_tid, NULL::timestamptz AS k_at,"
            " NULL::bigint AS k_id,"
            " (SELECT pg_snapshot_xmax(q.s)::text || ':' || coalesce((SELECT string_agg(x::text, ',')"
            " FROM pg_snapshot_xip(q.s) AS x), '') FROM (SELECT pg_current_snapshot() AS s) AS q) AS k_xip,"
            " NULL::timestamptz AS s_at, NULL::bigint AS s_id{nulls})"
        ).format(nulls=sql.SQL("").join(sql.SQL(", NULL AS {}").format(sql.Identifier(n)) for n in names))
    )
    shown = sql.SQL(", ").join(sql.Identifier("page", n) for n in (*KEY_COLUMNS, *names))
    # the sort keys s_at and s_id stay in the server
    return sql.SQL(
        "SELECT {} FROM ({}) AS page ORDER BY page.phase, page.k_xid, page.k_tid, page.s_at, page.s_id"
    ).format(shown, sql.SQL(" UNION ALL ").join(parts))


def forward_statement(
    audit: sql.Identifier,
    columns: sql.Composable,
    where: Any,
    position: Position,
    params: dict[str, Any],
    lateral: sql.Composable = _NOTHING,
    tx_join: sql.Composable = PLAIN_JOIN,
) -> sql.Composed:
    """The rows after ``position`` in position order, with ``columns`` only: the second statement
    of a page read in one ``REPEATABLE READ`` snapshot (see :func:`page_statement`)."""
    extra: list[sql.Composable] = []
    if position.at is not None:
        params["f_at"], params["f_id"] = position.at, position.id
        extra.append(sql.SQL("c.captured_at >= %(f_at)s AND (c.captured_at, c.id) > (%(f_at)s, %(f_id)s)"))
    return sql.SQL(
        "SELECT {columns} FROM {audit}.changes c LEFT JOIN {audit}.transactions t ON {tx_join}"
        "{lateral}{where} ORDER BY c.captured_at, c.id"
    ).format(columns=columns, audit=audit, tx_join=tx_join, lateral=lateral, where=where(params, extra))


SAME_SNAPSHOT = sql.SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
"""Run first in a new transaction: every statement of it then reads the same snapshot."""


@dataclass(frozen=True)
class Snapshot:
    """What the closing row says of the page's snapshot: ``xmax`` and the in-progress list."""

    xmax: int
    in_progress: frozenset[int]


class Reader:
    """Follows the rows of a page statement as they are consumed and computes the next position.

    Call :meth:`take` with each row's key columns in order (it says whether the row belongs to
    the page), then :meth:`close` with the closing row's :class:`Snapshot`.
    """

    def __init__(
        self, position: Position, limit: int | None, load_at: Callable[[Any], datetime] | None = None
    ) -> None:
        self.position = position
        self.limit = limit
        self._load_at = load_at
        self.taken = 0
        self._late_fetched = 0
        self._late_taken = 0
        self._last_late: Watched | None = None
        self._forward_fetched = 0
        self._forward_taken = 0
        self._last_forward: tuple[Any, int] | None = None

    def take_all(
        self, rows: Sequence[tuple[Any, ...]], key: Callable[[tuple[Any, ...]], tuple[Any, int]] | None = None
    ) -> None:
        """Account for rows (led by the key columns) that all belong to the page: a page without
        a limit, whose rows are only counted here and whose last keys are kept. ``key`` gives
        the position of a row read without ``forward_keys``."""
        late = forward = None
        for row in reversed(rows):
            if row[0] == LATE and late is None:
                late = row
            elif row[0] == FORWARD and forward is None:
                forward = row
            if late is not None and forward is not None:
                break
        if forward is not None and forward[3] is None and key is not None:
            at, ident = key(forward)
            forward = (forward[0], None, None, at, ident)
        for row in (late, forward):
            if row is not None:
                self._count(row)
        counted = (late is not None) + (forward is not None)
        n_late = sum(1 for row in rows if row[0] == LATE)
        n_forward = len(rows) - n_late
        self._late_fetched += n_late - (late is not None)
        self._late_taken += n_late - (late is not None)
        self._forward_fetched += n_forward - (forward is not None)
        self._forward_taken += n_forward - (forward is not None)
        self.taken += len(rows) - counted

    def take_forward(self, count: int, last: tuple[Any, int] | None) -> None:
        """Account for ``count`` rows in position order read by :func:`forward_statement` (all
        part of the page, which has no limit); ``last`` is the last one's position."""
        self._forward_fetched += count
        self._forward_taken += count
        self.taken += count
        if last is not None:
            self._last_forward = last

    def _count(self, row: tuple[Any, ...]) -> None:
        self.take(row[0], row[1], row[2], row[3], row[4])

    def take(self, phase: int, xid: int | None, tid: int | None, at: Any, cid: int) -> bool:
        """Account for one row; ``True`` when it is part of the page."""
        full = self.limit is not None and self.taken >= self.limit
        if phase == LATE:
            self._late_fetched += 1
            if full:
                return False
            assert xid is not None and tid is not None
            self._late_taken += 1
            self._last_late = Watched(xid, tid, cid)
        else:
            self._forward_fetched += 1
            # rows in position order belong to the page only once every late row has been taken
            if full or self._late_taken < self._late_fetched:
                return False
            assert at is not None
            self._forward_taken += 1
            self._last_forward = (at, cid)
        self.taken += 1
        return True

    def close(self, snapshot: Snapshot) -> tuple[Position, bool]:
        """The next position, and whether more rows were ready when the page was read."""
        running = snapshot.in_progress
        old = self.position
        if self._late_taken < self._late_fetched:
            # The page ended among the late rows: keep the position, drop the transactions whose
            # late rows were all returned, and remember how far the last one got.
            last = self._last_late
            assert last is not None
            pending: dict[int, Watched] = {}
            for w in old.watched:
                if w.xid in running or w.xid > last.xid:
                    pending[w.xid] = w
                elif w.xid == last.xid:
                    pending[w.xid] = last
            done = old.above_done
            if old.above is not None and last.xid >= old.above and last.xid not in pending:
                done = last
                # transactions of the range that the progress passes while they still run
                for xid in running:
                    if old.above <= xid <= last.xid:
                        pending.setdefault(xid, Watched(xid))
            watched = tuple(sorted(pending.values(), key=lambda w: w.xid))
            return Position(old.at, old.id, watched, old.above, done), True
        at, ident = old.at, old.id
        if self._last_forward is not None:
            raw_at, ident = self._last_forward
            at = raw_at if self._load_at is None else self._load_at(raw_at)
        watched = tuple(Watched(x) for x in sorted(running))
        return Position(at, ident, watched, snapshot.xmax), self._forward_fetched > self._forward_taken


def parse_snapshot(text: str) -> Snapshot:
    """The closing row's ``xmax:xip,...`` text."""
    xmax, _, listed = text.partition(":")
    return Snapshot(int(xmax), frozenset(int(x) for x in listed.split(",") if x))
