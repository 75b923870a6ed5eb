"""The page cursor: the :class:`Position` a reader has reached, and its opaque text form.

:func:`encode` turns a position into the cursor that :func:`threadline.timeline` and
:func:`threadline.export` hand out; :func:`decode` reads it back and refuses anything else. Why a
position carries watched transactions is told in :mod:`threadline.explore.paging`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from threadline.core.errors import InvalidCursor
from threadline.core.records import iso

__all__ = ["MAX_CURSOR_LENGTH", "START", "Position", "Watched", "decode", "encode"]

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
