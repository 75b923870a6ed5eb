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

This module is the paging family's one import point: the cursor format is
:mod:`~threadline.explore.page_cursor`, the statements :mod:`~threadline.explore.page_statements`,
and the next position :mod:`~threadline.explore.page_reader`.
"""

from __future__ import annotations

from threadline.explore.page_cursor import MAX_CURSOR_LENGTH, START, Position, Watched, decode, encode
from threadline.explore.page_reader import Reader, Snapshot, parse_snapshot
from threadline.explore.page_statements import (
    CLOSING,
    FORWARD,
    KEY_COLUMNS,
    LATE,
    PLAIN_JOIN,
    SAME_SNAPSHOT,
    forward_statement,
    page_statement,
)

__all__ = [
    "CLOSING",
    "FORWARD",
    "KEY_COLUMNS",
    "LATE",
    "MAX_CURSOR_LENGTH",
    "PLAIN_JOIN",
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
