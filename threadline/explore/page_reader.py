"""Reading a page's rows: :class:`Reader` counts the rows of a page statement as they are consumed
and, with the closing row's :class:`Snapshot`, computes the position the next page starts from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from threadline.explore.page_cursor import Position, Watched
from threadline.explore.page_statements import FORWARD, LATE

__all__ = ["SEEN", "Reader", "Snapshot", "parse_snapshot"]


SEEN = 2**63 - 1
"""The progress of a watched transaction whose rows at or before the position were all returned."""


@dataclass(frozen=True)
class Snapshot:
    """What the closing row says of the page's snapshot: ``xmax``, the in-progress list, and the
    reader's own transaction when it has written (``own``)."""

    xmax: int
    in_progress: frozenset[int]
    own: int | None = None


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
        following = [Watched(x) for x in running]
        if snapshot.own is not None:
            # The reader's own transaction, which wrote: its rows were visible to it and returned
            # up to the position, though it still runs (and its snapshot does not list it): marked
            # as seen, they are not read again as late rows once it commits.
            following.append(Watched(snapshot.own, SEEN, SEEN))
        following.sort(key=lambda w: w.xid)
        more = self._forward_fetched > self._forward_taken
        return Position(at, ident, tuple(following), snapshot.xmax), more


def parse_snapshot(text: str) -> Snapshot:
    """The closing row's ``xmax:xip,...[:own]`` text."""
    xmax, _, rest = text.partition(":")
    listed, _, own = rest.partition(":")
    return Snapshot(int(xmax), frozenset(int(x) for x in listed.split(",") if x), int(own) if own else None)
