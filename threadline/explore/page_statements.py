"""The SQL of a page: :func:`page_statement` reads a page's late rows, its rows in position order
and the snapshot's in-progress transactions in one statement; :func:`forward_statement` reads the
rows in position order alone, in the same snapshot (:data:`SAME_SNAPSHOT`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from threadline.explore.page_cursor import Position

__all__ = [
    "CLOSING",
    "FORWARD",
    "KEY_COLUMNS",
    "LATE",
    "PLAIN_JOIN",
    "SAME_SNAPSHOT",
    "forward_statement",
    "page_statement",
]

KEY_COLUMNS = ("phase", "k_xid", "k_tid", "k_at", "k_id", "k_xip")
"""Columns every row of a page statement starts with: the phase (0 late, 1 in position order,
2 the closing row that carries the snapshot's in-progress transactions, and the reader's own
transaction when it has written) and the row's keys."""

LATE, FORWARD, CLOSING = 0, 1, 2
"""The phases of a page statement's rows (its first key column)."""

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
            " FROM pg_snapshot_xip(q.s) AS x), '') || coalesce(':' || pg_current_xact_id_if_assigned()::text, '')"
            " FROM (SELECT pg_current_snapshot() AS s) AS q) AS k_xip,"
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
