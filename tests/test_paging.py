"""Paging is complete while other transactions write: a change captured early by a transaction
that commits after a reader has paged past its capture time is still returned, exactly once.

Every test here runs real concurrent transactions on separate connections; the reader follows the
cursor the way an incremental export or a follower would.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import threadline
from threadline import ddl
from threadline.core.errors import InvalidCursor
from threadline.explore import paging
from threadline.explore.timeline_query import LAST_WINDOW, next_window, window_end

from .conftest import sync_change_starts

Conn = psycopg.Connection[Any]


@pytest.fixture
def items(conn: Conn) -> Iterator[None]:
    conn.execute("CREATE TABLE app.items (id int PRIMARY KEY, note text)")
    ddl.track(conn, "app.items")
    yield


def _write(dsn: str, first: int, count: int = 1) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for i in range(first, first + count):
            c.execute("INSERT INTO app.items VALUES (%s, 'x')", (i,))


def _follow(conn: Conn, cursor: str | None, limit: int, until: float | None = None) -> tuple[list[int], str]:
    """Read pages until the end (or, with ``until``, until that monotonic time: writers may keep
    ahead of a follower on a busy machine); the ids of the inserted rows seen, and the resume cursor."""
    seen: list[int] = []
    while True:
        page = threadline.timeline(conn, table="app.items", limit=limit, after=cursor)
        seen.extend(c.pk["id"] for c in page if c.pk)
        assert page.cursor
        cursor = page.cursor
        if page.next_cursor is None or (until is not None and time.monotonic() >= until):
            return seen, cursor
        assert page.next_cursor == page.cursor


@pytest.mark.parametrize("limit", [1, 2, 100])
def test_a_long_transaction_committing_after_the_pages_were_read_is_not_missed(
    conn: Conn, dsn: str, items: None, limit: int
) -> None:
    late = psycopg.connect(dsn)  # a transaction that writes first and commits last
    try:
        for i in range(3):
            late.execute("INSERT INTO app.items VALUES (%s, 'late')", (100 + i,))
        _write(dsn, 1, 5)
        seen, cursor = _follow(conn, None, limit)
        assert seen == [1, 2, 3, 4, 5]  # the running transaction's rows are not visible yet
        late.execute("INSERT INTO app.items VALUES (103, 'late')")
        late.commit()
    finally:
        late.close()
    _write(dsn, 6, 2)
    rest, cursor = _follow(conn, cursor, limit)
    # the late rows come first, in their transaction's order, then the rows in capture order
    assert rest == [100, 101, 102, 103, 6, 7]
    again, _ = _follow(conn, cursor, limit)
    assert again == []


def test_late_rows_of_several_transactions_span_pages_exactly_once(conn: Conn, dsn: str, items: None) -> None:
    running = [psycopg.connect(dsn) for _ in range(3)]
    try:
        for n, tx in enumerate(running):
            for i in range(4):
                tx.execute("INSERT INTO app.items VALUES (%s, 'late')", (100 * (n + 1) + i,))
        _write(dsn, 1, 3)
        seen, cursor = _follow(conn, None, 2)
        assert seen == [1, 2, 3]
        running[1].commit()  # the middle one first
        part, cursor = _follow(conn, cursor, 3)
        assert part == [200, 201, 202, 203]
        running[2].commit()
        running[0].commit()
    finally:
        for tx in running:
            tx.close()
    rest, _ = _follow(conn, cursor, 3)
    assert sorted(rest) == [100, 101, 102, 103, 300, 301, 302, 303]
    assert len(rest) == 8


def test_a_rolled_back_transaction_leaves_the_cursor_and_returns_nothing(
    conn: Conn, dsn: str, items: None
) -> None:
    with psycopg.connect(dsn) as doomed:
        doomed.execute("INSERT INTO app.items VALUES (50, 'never')")
        row = doomed.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert row is not None
        _write(dsn, 1, 2)
        seen, cursor = _follow(conn, None, 10)
        # the running one is watched (transactions of other databases may be too: harmless)
        assert row[0] in {w.xid for w in paging.decode(cursor, _fingerprint(conn)).watched}
        doomed.rollback()
    _write(dsn, 3)
    rest, cursor = _follow(conn, cursor, 10)
    assert (seen, rest) == ([1, 2], [3])
    assert row[0] not in {w.xid for w in paging.decode(cursor, _fingerprint(conn)).watched}


def _fingerprint(conn: Conn) -> str:
    return threadline.timeline(conn, table="app.items", limit=1).filters.fingerprint()


def test_concurrent_writers_and_a_follower_see_every_change_once(conn: Conn, dsn: str, items: None) -> None:
    """Writers hold their transactions open for random times while a follower pages; after they
    stop, following to the end has returned every committed row exactly once."""
    stop = threading.Event()
    committed: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        rnd = random.Random(n)
        with psycopg.connect(dsn) as c:
            i = 0
            while not stop.is_set():
                ids = [n * 100_000 + i + k for k in range(rnd.randint(1, 3))]
                i += len(ids)
                for ident in ids:
                    c.execute("INSERT INTO app.items VALUES (%s, 'w')", (ident,))
                    time.sleep(rnd.random() * 0.01)
                if rnd.random() < 0.2:
                    c.rollback()
                    continue
                c.commit()
                with lock:
                    committed.extend(ids)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    seen: list[int] = []
    cursor = None
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        part, cursor = _follow(conn, cursor, 7, until=deadline)
        seen.extend(part)
    stop.set()
    for t in threads:
        t.join()
    part, _ = _follow(conn, cursor, 7)
    seen.extend(part)
    assert len(committed) > 50
    assert sorted(seen) == sorted(committed)
    assert len(seen) == len(set(seen))


def test_export_resumes_from_its_cursor(conn: Conn, dsn: str, items: None) -> None:
    late = psycopg.connect(dsn)
    try:
        late.execute("INSERT INTO app.items VALUES (100, 'late')")
        _write(dsn, 1, 3)
        out = io.StringIO()
        first = threadline.export(conn, out, "ndjson", table="app.items")
        assert first == 3 and first.cursor
        late.commit()
    finally:
        late.close()
    _write(dsn, 4)
    out = io.StringIO()
    second = threadline.export(conn, out, "ndjson", table="app.items", after=first.cursor)
    assert [json.loads(line)["pk"]["id"] for line in out.getvalue().splitlines()] == [100, 4]
    assert second == 2
    out = io.StringIO()
    assert threadline.export(conn, out, "csv", table="app.items", after=second.cursor) == 0
    with pytest.raises(InvalidCursor, match="other filters"):
        threadline.export(conn, io.StringIO(), "csv", after=second.cursor)


def test_export_with_a_limit_resumes_where_it_stopped(conn: Conn, dsn: str, items: None) -> None:
    _write(dsn, 1, 5)
    ids: list[int] = []
    cursor = None
    for _ in range(4):
        out = io.StringIO()
        result = threadline.export(conn, out, "json", table="app.items", limit=2, after=cursor)
        ids.extend(c["pk"]["id"] for c in json.loads(out.getvalue())["changes"])
        cursor = result.cursor
    assert ids == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("limit", [2, 100])
def test_a_reader_that_wrote_in_its_own_transaction_does_not_read_its_rows_again(
    dsn: str, items: None, limit: int
) -> None:
    # its own rows are visible to it though it still runs, and its snapshot does not list it:
    # once it commits they are not late rows. Its snapshot is taken before it writes, so its
    # transaction id is at or above the snapshot's xmax whatever other sessions do meanwhile.
    with psycopg.connect(dsn) as writer:  # not in autocommit: one transaction until commit()
        writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        writer.execute("SELECT 1")
        writer.execute("INSERT INTO app.items SELECT g, 'mine' FROM generate_series(1, 3) g")
        # (read again as late rows, they would fill every next page: give up after a while)
        seen, cursor = _follow(writer, None, limit, until=time.monotonic() + 5)
        exported = threadline.export(writer, io.StringIO(), "csv", table="app.items")
        writer.commit()
        again, _ = _follow(writer, cursor, limit, until=time.monotonic() + 5)
        out = io.StringIO()
        nothing = threadline.export(writer, out, "csv", table="app.items", after=exported.cursor)
    assert (seen, again) == ([1, 2, 3], [])
    assert (int(exported), int(nothing)) == (3, 0), out.getvalue()


def test_a_cursor_from_inside_a_writing_transaction_followed_elsewhere_misses_nothing(
    conn: Conn, dsn: str, items: None
) -> None:
    with psycopg.connect(dsn) as writer:
        writer.execute("INSERT INTO app.items SELECT g, 'mine' FROM generate_series(1, 3) g")
        page = threadline.timeline(writer, table="app.items", limit=2)
        assert [c.pk["id"] for c in page] == [1, 2]
        _write(dsn, 4)  # committed after the writer's row 3 was captured
        # another reader, while the writer still runs, pages past its row 3 (not visible to it)
        meanwhile, cursor = _follow(conn, page.cursor, 2)
        writer.commit()
    later, _ = _follow(conn, cursor, 2)
    assert meanwhile == [4]
    assert set(later) >= {3}  # late, once committed (its rows seen by itself may come again)


def test_cursor_checks(conn: Conn, items: None) -> None:
    fp = _fingerprint(conn)
    position = paging.Position(None, None, (paging.Watched(7), paging.Watched(9, 3, 4)))
    assert paging.decode(paging.encode(position, fp), fp) == position
    for bad in ("", "x" * (paging.MAX_CURSOR_LENGTH + 1), "eyJ2IjoyfQ", "bm9wZQ"):
        with pytest.raises(InvalidCursor):
            paging.decode(bad, fp)
    with pytest.raises(InvalidCursor):  # a negative transaction id
        paging.decode(paging.encode(paging.Position(None, None, (paging.Watched(-1),)), fp), fp)


def test_async_timeline_and_export_resume_the_same_way(conn: Conn, dsn: str, items: None) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            late = psycopg.connect(dsn)
            try:
                late.execute("INSERT INTO app.items VALUES (100, 'late')")
                _write(dsn, 1, 2)
                page = await threadline.timeline_async(aconn, table="app.items")
                exported = await threadline.export_async(aconn, io.StringIO(), "csv", table="app.items")
                assert len(page) == 2 and exported == 2
                late.commit()
            finally:
                late.close()
            rest = await threadline.timeline_async(aconn, table="app.items", after=page.cursor)
            out = io.StringIO()
            again = await threadline.export_async(
                aconn, out, "ndjson", table="app.items", after=exported.cursor
            )
            assert [c.pk for c in rest] == [{"id": 100}] and again == 1
            assert json.loads(out.getvalue())["pk"] == {"id": 100}

    asyncio.run(main())


def test_export_reads_one_snapshot_also_on_a_bridged_connection_under_a_context(
    dsn: str, items: None
) -> None:
    # the export's own transaction starts with the context's SET LOCAL, then fixes its snapshot
    _write(dsn, 1, 2)
    with (
        threadline.ThreadlineConnection.connect(dsn, autocommit=True) as conn,
        threadline.context(actor="user:1", correlation_id="exporting"),
    ):
        first = threadline.export(conn, io.StringIO(), "csv", table="app.items")
        _write(dsn, 3)
        again = threadline.export(conn, io.StringIO(), "csv", table="app.items", after=first.cursor)
        assert (first, again) == (2, 1)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_table_pages_read_in_windows_of_capture_time_miss_nothing(
    conn: Conn, items: None, limit: int
) -> None:
    # a table's page is looked for in growing windows of capture time (an hour first, each next
    # one sized from what the last held, then everything): changes spread over 90 days, sparse and
    # dense, come back in order
    conn.execute("CREATE TABLE app.other (id int PRIMARY KEY)")
    ddl.track(conn, "app.other")
    rnd = random.Random(limit)
    for i in range(40):
        conn.execute("INSERT INTO app.items VALUES (%s, 'x')", (i,))
        conn.execute("INSERT INTO app.other VALUES (%s)", (i,))
    hours = sorted(rnd.choice([0, 0, 1, 5, 30, 200, 900, 2000]) + rnd.random() for _ in range(40))
    rows = conn.execute("SELECT id FROM threadline.changes WHERE table_name = 'items' ORDER BY id").fetchall()
    for (change_id,), h in zip(rows, hours, strict=True):
        conn.execute(
            "UPDATE threadline.changes SET captured_at = now() - interval '2200 hours' + %s * interval '1 hour'"
            " WHERE id = %s",
            (h, change_id),
        )
    conn.execute(  # a transaction starts before its changes are captured
        "UPDATE threadline.transactions t SET occurred_at = c.captured_at - interval '1 second'"
        "  FROM threadline.changes c WHERE c.transaction_id = t.id AND c.table_name = 'items'"
    )
    sync_change_starts(conn)
    expected = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM threadline.changes WHERE table_name = 'items' ORDER BY captured_at, id"
        ).fetchall()
    ]
    seen: list[int] = []
    cursor = None
    while True:
        page = threadline.timeline(conn, table="app.items", limit=limit, after=cursor)
        seen.extend(c.id for c in page)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == expected
    # bounded by until, and by since: the same order, cut
    cut = conn.execute("SELECT now() - interval '1000 hours'").fetchone()[0]  # type: ignore[index]
    early = threadline.timeline(conn, table="app.items", until=cut, limit=100)
    late = threadline.timeline(conn, table="app.items", since=cut, limit=100)
    assert [c.id for c in early] + [c.id for c in late] == expected


def test_the_next_window_is_sized_from_what_the_last_one_held() -> None:
    hour = timedelta(hours=1)
    assert next_window(hour, 70, 101) == hour * (1.5 * 101 / 70)  # about 2.2 hours for 101 rows
    assert next_window(hour, 100, 101) == hour * 2  # at least double
    assert next_window(hour, 0, 101) == hour * 24  # nothing seen: a day
    assert next_window(hour, 1, 101) == hour * 151.5


def test_a_window_ends_unbounded_past_the_last_width_or_the_until_filter() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert window_end(start, timedelta(hours=3), None) == start + timedelta(hours=3)
    assert window_end(None, timedelta(hours=3), None) is None
    assert window_end(start, LAST_WINDOW + timedelta(seconds=1), None) is None
    assert window_end(start, LAST_WINDOW, None) == start + LAST_WINDOW
    assert window_end(start, timedelta(hours=3), start + timedelta(hours=3)) is None
    assert window_end(start, timedelta(hours=3), start + timedelta(hours=4)) == start + timedelta(hours=3)
