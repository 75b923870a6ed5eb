"""The context → PostgreSQL bridge: threadline.transaction() and ThreadlineConnection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

import threadline
from threadline import ActorRef, ThreadlineConnection
from threadline.propagation.web import bind_actor

from .conftest import changes, transactions

SHOW = "SELECT current_setting('threadline.context', true)"


def _actor(conn: psycopg.Connection[Any]) -> list[Any]:
    return [r["actor"] for r in transactions(conn)]


@contextlib.contextmanager
def _sent_messages(conn: psycopg.Connection[Any], path: Any) -> Iterator[list[str]]:
    """The protocol messages the client sends inside the block, from libpq's trace."""
    sent: list[str] = []
    with path.open("w") as f:
        conn.pgconn.trace(f.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            conn.pgconn.untrace()
    sent.extend(line for line in path.read_text().splitlines() if line.startswith("F"))


def test_transaction_applies_context_and_nests_as_savepoints(dsn: str, conn: Any, posts: str) -> None:
    with psycopg.connect(dsn) as c:
        with threadline.context(actor="user:1", correlation_id="r1"), threadline.transaction(c) as tx:
            assert isinstance(tx, psycopg.Transaction)
            c.execute("INSERT INTO app.posts (id) VALUES (1)")
            with threadline.context(actor="user:2"), threadline.transaction(c):
                assert '"user"' in c.execute(SHOW).fetchone()[0] and '"2"' in c.execute(SHOW).fetchone()[0]
            with (
                pytest.raises(ZeroDivisionError),
                threadline.context(actor="user:3"),
                threadline.transaction(c),
            ):
                raise ZeroDivisionError
            assert '"1"' in c.execute(SHOW).fetchone()[0]  # savepoint rollback restored it
        assert c.execute(SHOW).fetchone()[0] in (None, "")  # nothing outlives the transaction
        c.rollback()
        with pytest.raises(TypeError):

            async def wrong() -> None:
                async with threadline.transaction(c):
                    pass

            asyncio.run(wrong())
    assert _actor(conn) == [{"type": "user", "id": "1"}]


def test_async_transaction_twin(dsn: str, conn: Any, posts: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as ac:
            with threadline.context(actor=ActorRef.user("async"), correlation_id="ra"):
                async with threadline.transaction(ac):
                    await ac.execute("INSERT INTO app.posts (id) VALUES (1)")

    asyncio.run(main())
    assert _actor(conn) == [{"type": "user", "id": "async"}]


def test_automatic_mode_covers_implicit_explicit_and_autocommit_transactions(
    dsn: str, conn: Any, posts: str
) -> None:
    with ThreadlineConnection.connect(dsn) as c:
        with threadline.context(actor="user:implicit"):
            c.execute("INSERT INTO app.posts (id) VALUES (1)")
            c.commit()
        with threadline.context(actor="user:explicit"), c.transaction():
            c.execute("INSERT INTO app.posts (id) VALUES (2)")
        with threadline.context(actor="user:explicit2"), c.transaction():  # same shape, new context
            c.execute("INSERT INTO app.posts (id) VALUES (3)")
        with threadline.context(actor="user:changed"):
            c.execute("INSERT INTO app.posts (id) VALUES (4)")
            with threadline.context(actor="user:later"):
                c.execute("INSERT INTO app.posts (id) VALUES (5)")  # mid-transaction change: last wins
            c.commit()
        c.execute("INSERT INTO app.posts (id) VALUES (6)")  # no context at all
        c.commit()
        with threadline.context(actor="user:rolledback"):
            c.execute("INSERT INTO app.posts (id) VALUES (7)")
            c.rollback()
        c.autocommit = True
        with threadline.context(actor="user:auto"):
            c.execute("INSERT INTO app.posts (id) VALUES (8)")
            c.cursor().executemany("INSERT INTO app.posts (id) VALUES (%s)", [(9,), (10,)])
        c.execute("INSERT INTO app.posts (id) VALUES (11)")
    got = [(r["pk"]["id"], (r["actor"] or {}).get("id")) for r in changes(conn)]
    assert got == [
        (1, "implicit"),
        (2, "explicit"),
        (3, "explicit2"),
        (4, "later"),
        (5, "later"),
        (6, None),
        (8, "auto"),
        (9, "auto"),
        (10, "auto"),
        (11, None),
    ]


def test_executemany_in_a_transaction_carries_context(dsn: str, conn: Any, posts: str) -> None:
    with ThreadlineConnection.connect(dsn) as c, threadline.context(actor="user:many"):
        c.cursor().executemany("INSERT INTO app.posts (id) VALUES (%s)", [(1,), (2,)])
        c.commit()
    assert {(r["actor"] or {}).get("id") for r in changes(conn)} == {"many"}


def test_pool_connections_never_carry_a_previous_context(dsn: str, conn: Any, posts: str) -> None:
    with ConnectionPool(
        dsn, min_size=1, max_size=1, connection_class=ThreadlineConnection, open=True
    ) as pool:
        with pool.connection() as c, threadline.context(actor="user:first"):
            c.execute("INSERT INTO app.posts (id) VALUES (1)")
        with pool.connection() as c:
            assert c.execute(SHOW).fetchone()[0] in (None, "")
            c.execute("INSERT INTO app.posts (id) VALUES (2)")
    assert [(r["actor"] or {}).get("id") for r in changes(conn)] == ["first", None]


def test_concurrent_writers_never_cross_talk(dsn: str, conn: Any, posts: str) -> None:
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []

    with ConnectionPool(
        dsn, min_size=4, max_size=4, connection_class=ThreadlineConnection, open=True
    ) as pool:

        def writer(i: int) -> None:
            try:
                for k in range(per_thread):
                    with (
                        threadline.context(actor=ActorRef.user(str(i)), correlation_id=f"w{i}-{k}"),
                        pool.connection() as c,
                    ):
                        c.execute("INSERT INTO app.posts (id, title) VALUES (%s, %s)", (i * 1000 + k, str(i)))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    rows = changes(conn)
    assert len(rows) == n_threads * per_thread
    for r in rows:
        writer_id = r["after"]["title"]
        assert r["actor"] == {"type": "user", "id": writer_id}
        assert r["correlation_id"] == f"w{writer_id}-{r['pk']['id'] - int(writer_id) * 1000}"


@pytest.mark.parametrize("factory", [psycopg.ClientCursor, psycopg.RawCursor])
def test_automatic_mode_keeps_working_with_another_cursor_class(
    dsn: str, conn: Any, posts: str, factory: type[psycopg.Cursor[Any]]
) -> None:
    with ThreadlineConnection.connect(dsn, cursor_factory=factory) as app:
        assert issubclass(app.cursor_factory, factory)
        with threadline.context(actor="user:client"):
            query = (
                "INSERT INTO app.posts (id) VALUES ($1)"
                if factory is psycopg.RawCursor
                else ("INSERT INTO app.posts (id) VALUES (%s)")
            )
            app.execute(query, [1])
            app.commit()
    assert [r["actor"] for r in changes(conn)] == [{"type": "user", "id": "client"}]


def test_automatic_mode_in_pipeline_mode(dsn: str, conn: Any, posts: str) -> None:
    with ThreadlineConnection.connect(dsn) as app:
        with threadline.context(actor="user:piped"), app.pipeline():
            app.execute("INSERT INTO app.posts (id) VALUES (1)")
            app.execute("INSERT INTO app.posts (id) VALUES (2)")
        app.commit()
        with app.pipeline():  # no context: nothing is sent for it
            app.execute("INSERT INTO app.posts (id) VALUES (3)")
        app.commit()
    rows = changes(conn)
    assert [r["actor"] for r in rows] == [{"type": "user", "id": "piped"}] * 2 + [None]
    assert rows[0]["transaction_id"] == rows[1]["transaction_id"] != rows[2]["transaction_id"]


def test_autocommit_client_cursor_sends_context_and_statement_as_one_query(
    dsn: str, conn: Any, posts: str, tmp_path: Any
) -> None:
    notices: list[str] = []
    with ThreadlineConnection.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as app:
        app.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        # a context whose JSON holds '%' and quotes, parameters holding them too
        with threadline.context(actor="user:c%s'1", correlation_id="50%_off", meta={"q": "it's %(x)s"}):
            with _sent_messages(app, tmp_path / "trace") as sent:
                cur = app.execute(
                    "INSERT INTO app.posts (id, title) VALUES (%s, %s), (%s, '100%%') RETURNING id",
                    [1, "a%sb'c", 2],
                )
            assert len(sent) == 1 and '\tQuery\t "SET LOCAL threadline.context = ' in sent[0], sent
            assert "; INSERT INTO app.posts" in sent[0]
            assert cur.rowcount == 2 and cur.fetchall() == [(1,), (2,)]
            assert cur.statusmessage == "INSERT 0 2" and cur.nextset() is None
            assert app.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with pytest.raises(psycopg.errors.UniqueViolation):
                app.execute("INSERT INTO app.posts (id) VALUES (%s)", [1])
            assert app.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            app.execute("UPDATE app.posts SET views = views + 1 WHERE id = %s", [2])
        assert app.execute(SHOW).fetchone()[0] in (None, "")  # nothing outlived the statements
        app.execute("UPDATE app.posts SET views = views + 1 WHERE id = 1")  # no context: nothing sent
    rows = changes(conn)
    assert [r["after"]["title"] for r in rows[:2]] == ["a%sb'c", "100%"]
    assert [r["actor"] for r in rows] == [{"type": "user", "id": "c%s'1"}] * 3 + [None]
    assert rows[0]["correlation_id"] == "50%_off" and rows[0]["meta"] == {"q": "it's %(x)s"}
    assert rows[0]["transaction_id"] == rows[1]["transaction_id"] != rows[2]["transaction_id"]
    assert notices == []  # no "SET LOCAL outside a transaction block" warning


def test_named_cursor_statements_carry_the_context(dsn: str, conn: Any, posts: str) -> None:
    with ThreadlineConnection.connect(dsn) as app:
        with threadline.context(actor="user:named"):
            # the DECLARE is the transaction's first statement: it begins it with the context
            named = app.cursor("c1")
            named.execute("SELECT current_setting('threadline.context', true)")
            assert '"named"' in named.fetchone()[0]
            named.close()
            with threadline.context(actor="user:changed"):
                named = app.cursor("c2")
                named.execute("SELECT current_setting('threadline.context', true)")
                assert '"changed"' in named.fetchone()[0]
                named.close()
        app.commit()
    psycopg_conn = psycopg.connect(dsn)
    threadline.propagation.psycopg.bridge(psycopg_conn)
    assert isinstance(psycopg_conn, ThreadlineConnection)
    assert issubclass(
        psycopg_conn.server_cursor_factory, threadline.propagation.psycopg.ThreadlineServerCursor
    )
    with psycopg_conn, threadline.context(actor="user:bridged"):
        psycopg_conn.execute("INSERT INTO app.posts (id) VALUES (7)")
        psycopg_conn.commit()
    with pytest.raises(threadline.ConfigurationError):
        threadline.propagation.psycopg.bridge(object())  # type: ignore[arg-type]
    assert [r["actor"] for r in changes(conn)] == [{"type": "user", "id": "bridged"}]


def test_begin_with_context_for_integrations(dsn: str, conn: Any, posts: str) -> None:
    from threadline.propagation.psycopg import begin_with_context

    with psycopg.connect(dsn) as c:
        c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        ctx = threadline.AuditContext(actor=ActorRef.user("integration"), correlation_id="int-1")
        begin_with_context(c, ctx)
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert c.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
        c.execute("INSERT INTO app.posts (id) VALUES (1)")
        c.commit()
    rows = changes(conn)
    assert [(r["actor"], r["correlation_id"]) for r in rows] == [
        ({"type": "user", "id": "integration"}, "int-1")
    ]


def test_client_cursor_opens_a_transaction_with_begin_context_and_statement_in_one_query(
    dsn: str, conn: Any, posts: str, tmp_path: Any
) -> None:
    with ThreadlineConnection.connect(dsn, cursor_factory=psycopg.ClientCursor) as app:
        app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with threadline.context(actor="user:o%s'1", correlation_id="open-1"):
            with _sent_messages(app, tmp_path / "trace") as sent:
                cur = app.execute(
                    "INSERT INTO app.posts (id, title) VALUES (%s, %s), (%s, '100%%') RETURNING id",
                    [1, "a%sb'c", 2],
                )
            # the statement's own result, and the transaction is open with the connection's settings
            assert cur.rowcount == 2 and cur.fetchall() == [(1,), (2,)] and cur.nextset() is None
            assert cur.statusmessage == "INSERT 0 2" and b"SET LOCAL" not in (cur._query.query or b"")
            assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            assert app.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
            app.execute("UPDATE app.posts SET views = 1 WHERE id = 2")
            app.commit()
            # a failing first statement leaves the transaction failed, like psycopg's own BEGIN
            with pytest.raises(psycopg.errors.UniqueViolation):
                app.execute("INSERT INTO app.posts (id) VALUES (%s)", [1])
            assert app.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            app.rollback()
            app.execute("UPDATE app.posts SET views = 2 WHERE id = %s", [1])
            app.commit()
        app.execute("UPDATE app.posts SET views = 3 WHERE id = 1")  # no context: psycopg's own BEGIN
        app.commit()
        with threadline.context(actor="user:o%s'1", correlation_id="open-2"):
            # a statement PostgreSQL cannot parse: the whole query is refused, BEGIN included
            with pytest.raises(psycopg.errors.SyntaxError):
                app.execute("INSERT INTO app.posts (id) VALUES (%s) oops", [9])
            app.rollback()
            app.execute("UPDATE app.posts SET views = 4 WHERE id = %s", [2])
            app.commit()
    assert len(sent) == 1 and "\tQuery\t" in sent[0], sent
    assert '"BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL threadline.context = ' in sent[0]
    rows = changes(conn)
    assert [r["op"] for r in rows] == ["insert", "insert", "update", "update", "update", "update"]
    assert [r["actor"] for r in rows] == [{"type": "user", "id": "o%s'1"}] * 4 + [None] + [
        {"type": "user", "id": "o%s'1"}
    ]
    assert rows[-1]["correlation_id"] == "open-2"
    assert rows[0]["transaction_id"] == rows[2]["transaction_id"] != rows[3]["transaction_id"]


@pytest.mark.parametrize("cursor_class", [psycopg.Cursor, psycopg.ClientCursor, psycopg.RawCursor])
def test_a_cursor_built_directly_carries_the_context_in_a_transaction(
    dsn: str, conn: Any, posts: str, cursor_class: Any
) -> None:
    query = (
        "INSERT INTO app.posts (id) VALUES ($1)"
        if cursor_class is psycopg.RawCursor
        else "INSERT INTO app.posts (id) VALUES (%s)"
    )
    with (
        ThreadlineConnection.connect(dsn) as tl,
        threadline.context(actor=ActorRef.user("5"), correlation_id="direct"),
    ):
        cursor_class(tl).execute(query, [1])  # not conn.cursor(): psycopg's class itself
        cursor_class(tl).execute(query, [2])
        tl.commit()
        with tl.transaction():  # an explicit transaction, first statement from a direct cursor
            cursor_class(tl).execute(query, [3])
        with tl.pipeline():  # nothing is sent synchronously: the setting is queued after BEGIN
            cursor_class(tl).execute(query, [4])
            with threadline.context(actor=ActorRef.user("6")):
                cursor_class(tl).execute(query, [5])
        tl.commit()
    rows = transactions(conn)
    assert [r["actor"]["id"] for r in rows] == ["5", "5", "6"], rows
    assert all(r["correlation_id"] == "direct" for r in rows)
    assert [c["transaction_id"] for c in changes(conn)] == [
        rows[0]["id"], rows[0]["id"], rows[1]["id"], rows[2]["id"], rows[2]["id"]
    ]  # fmt: skip


def test_a_transaction_block_sets_the_context_once(dsn: str, conn: Any, posts: str, tmp_path: Any) -> None:
    with ThreadlineConnection.connect(dsn) as app, threadline.context(actor=ActorRef.user("4")):
        with _sent_messages(app, tmp_path / "trace") as sent, app.transaction():
            app.execute("INSERT INTO app.posts (id) VALUES (1)")
            with threadline.context(correlation_id="changed"):  # changed mid-transaction: once more
                app.execute("UPDATE app.posts SET views = 1 WHERE id = 1")
        set_locals = [m for m in sent if "SET LOCAL threadline.context" in m]
        assert len(set_locals) == 2, sent


def _posts_by_actor(conn: psycopg.Connection[Any]) -> list[tuple[Any, Any]]:
    return [(r["pk"]["id"], (r["actor"] or {}).get("id")) for r in changes(conn)]


@pytest.mark.parametrize("cursor_class", [psycopg.Cursor, psycopg.ClientCursor])
def test_autocommit_statements_refused_in_a_transaction_block_run_alone(
    dsn: str, conn: Any, posts: str, cursor_class: Any
) -> None:
    conn.execute(
        "CREATE PROCEDURE app.commits() LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO app.posts (id) VALUES (10); COMMIT; INSERT INTO app.posts (id) VALUES (11); END $$"
    )
    conn.execute("CREATE PROCEDURE app.writes() LANGUAGE sql AS $$ INSERT INTO app.posts (id) VALUES (12) $$")
    with (
        ThreadlineConnection.connect(dsn, autocommit=True, cursor_factory=cursor_class) as c,
        threadline.context(actor="user:auto"),
    ):
        c.execute("INSERT INTO app.posts (id) VALUES (1)")
        for statement in (
            "VACUUM app.posts",
            "/* a /* nested */ comment */ -- and a line\n create index CONCURRENTLY posts_title ON app.posts (title)",
            "REINDEX TABLE CONCURRENTLY app.posts",
            psycopg.sql.SQL("DROP INDEX CONCURRENTLY {}").format(
                psycopg.sql.Identifier("app", "posts_title")
            ),
            b"CLUSTER",
            "DISCARD ALL",
        ):
            c.execute(statement)
        # A procedure that commits: sent with the context in one simple query (ClientCursor),
        # PostgreSQL refuses its COMMIT, and it is called again alone; pipelined (Cursor), some
        # servers (15, 16) let it commit, and its first transaction carries the context, while
        # others (18) refuse it as well.
        c.execute("CALL app.commits()")
        c.execute("CALL app.writes()")  # no commit: carries the context
        c.execute("INSERT INTO app.posts (id) VALUES (2)")
    got = sorted(_posts_by_actor(conn))
    first = "auto" if cursor_class is psycopg.Cursor and got[2] == (10, "auto") else None
    assert got == [(1, "auto"), (2, "auto"), (10, first), (11, None), (12, "auto")]


class _CountedSQL(psycopg.sql.SQL):
    """A statement that counts how often it is rendered."""

    renders = 0

    def as_bytes(self, context: Any = None) -> bytes:
        type(self).renders += 1
        return super().as_bytes(context)


@pytest.mark.parametrize("cursor_class", [psycopg.Cursor, psycopg.ClientCursor])
def test_an_autocommit_composed_statement_is_rendered_once(
    dsn: str, conn: Any, posts: str, cursor_class: Any
) -> None:
    with (
        ThreadlineConnection.connect(dsn, autocommit=True, cursor_factory=cursor_class) as c,
        threadline.context(actor="user:composed"),
    ):
        _CountedSQL.renders = 0
        c.execute(
            psycopg.sql.Composed(
                [_CountedSQL("INSERT INTO app.posts (id) VALUES ("), psycopg.sql.Literal(7), _CountedSQL(")")]
            )
        )
        assert _CountedSQL.renders == 2  # each part once
        c.execute(psycopg.sql.Composed([_CountedSQL("INSERT INTO app.posts (id) VALUES (%s)")]), [8])
    assert sorted(_posts_by_actor(conn)) == [(7, "composed"), (8, "composed")]


def test_a_context_that_ends_before_the_commit_leaves_the_transaction_attributed(
    dsn: str, conn: Any, posts: str
) -> None:
    with ThreadlineConnection.connect(dsn) as c:
        with threadline.context(actor="user:a"):
            c.execute("INSERT INTO app.posts (id) VALUES (1)")
        c.execute("SELECT 1")  # no context now: nothing is sent
        c.commit()
        with threadline.context(actor="user:a"):
            c.execute("INSERT INTO app.posts (id) VALUES (2)")
        with threadline.context(actor="user:b"):
            c.execute("SELECT 1")  # another context replaces it: the last one set wins
        c.commit()
    with psycopg.connect(dsn) as c:  # threadline.transaction(), nested blocks without a context
        with threadline.transaction(c), threadline.context(actor="user:inner"), threadline.transaction(c):
            c.execute("INSERT INTO app.posts (id) VALUES (3)")
        with threadline.context(actor="user:outer"), threadline.transaction(c):
            c.execute("INSERT INTO app.posts (id) VALUES (4)")
            with threadline.transaction(c):
                c.execute("INSERT INTO app.posts (id) VALUES (5)")
            c.execute("INSERT INTO app.posts (id) VALUES (6)")

    async def nested_async() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as ac:
            async with threadline.transaction(ac):
                with threadline.context(actor="user:async"):
                    async with threadline.transaction(ac):
                        await ac.execute("INSERT INTO app.posts (id) VALUES (7)")
            with threadline.context(correlation_id="late"):
                async with threadline.transaction(ac):
                    bind_actor(ActorRef.user("late"))
                    await threadline.apply_context_async(ac)
                    await ac.execute("INSERT INTO app.posts (id) VALUES (8)")

    asyncio.run(nested_async())
    assert _posts_by_actor(conn) == [
        (1, "a"), (2, "b"), (3, "inner"), (4, "outer"), (5, "outer"), (6, "outer"), (7, "async"), (8, "late")
    ]  # fmt: skip


def test_autocommit_copy_and_stream_carry_the_context(dsn: str, conn: Any, posts: str) -> None:
    with ThreadlineConnection.connect(dsn, autocommit=True) as c, threadline.context(actor="user:bulk"):
        with c.cursor().copy("COPY app.posts (id) FROM STDIN") as copy:
            copy.write_row((1,))
            copy.write_row((2,))
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        ids = [row[0] for row in c.cursor().stream("INSERT INTO app.posts (id) VALUES (3), (4) RETURNING id")]
        assert ids == [3, 4]
        rows = c.cursor().stream(
            "INSERT INTO app.posts (id) SELECT g FROM generate_series(5, 6) g RETURNING id"
        )
        assert next(rows) == (5,)
        rows.close()  # abandoned: the statement had finished, and commits as in autocommit
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        c.execute("INSERT INTO app.posts (id) VALUES (7)")
    got = _posts_by_actor(conn)
    assert sorted(got) == [(i, "bulk") for i in range(1, 8)]
    assert len({r["transaction_id"] for r in changes(conn)}) == 4


def test_every_two_phase_transaction_carries_the_context(dsn: str, conn: Any, posts: str) -> None:
    # tpc_begin() opens the transaction with psycopg's own BEGIN: what was applied to the one
    # before must not be taken for this one's (committed in one phase: the test server may allow
    # no prepared transactions)
    with (
        ThreadlineConnection.connect(dsn, cursor_factory=psycopg.ClientCursor) as app,
        threadline.context(actor="user:tpc"),
    ):
        for i in range(1, 4):
            app.tpc_begin(app.xid(1, f"threadline-tpc-{i}", "b"))
            app.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
            if i == 2:
                app.tpc_rollback()
            else:
                app.tpc_commit()
    assert [r["actor"] for r in changes(conn)] == [{"type": "user", "id": "tpc"}] * 2


def test_a_context_changed_in_a_pipeline_applies_before_the_next_sync(
    dsn: str, conn: Any, posts: str
) -> None:
    # until a pipeline syncs the server reports no transaction status (ACTIVE): a context that
    # becomes current between two queued statements is still applied to the transaction
    with ThreadlineConnection.connect(dsn) as app:
        with app.pipeline():
            with threadline.context(actor="user:first"):
                app.execute("INSERT INTO app.posts (id) VALUES (1)")
            with threadline.context(actor="user:second"):
                app.execute("INSERT INTO app.posts (id) VALUES (2)")
        app.commit()
    with ThreadlineConnection.connect(dsn, autocommit=True) as app, app.pipeline():
        app.execute("INSERT INTO app.posts (id) VALUES (3)")  # no context: nothing sent
        with threadline.context(actor="user:third"):
            app.execute("INSERT INTO app.posts (id) VALUES (4)")
        with app.transaction():
            app.execute("INSERT INTO app.posts (id) VALUES (5)")
            with threadline.context(actor="user:fourth"):
                app.execute("INSERT INTO app.posts (id) VALUES (6)")
    rows = changes(conn)
    # the last context set before the commit is the transaction's
    assert [r["actor"]["id"] for r in rows] == ["second", "second", "third", "third", "fourth", "fourth"]


def test_transaction_and_apply_context_in_pipeline_mode(dsn: str, conn: Any, posts: str) -> None:
    # in a pipeline the transaction is open while the server still reports ACTIVE
    with psycopg.connect(dsn) as app, app.pipeline():
        with threadline.context(actor="user:outer"), threadline.transaction(app):
            app.execute("INSERT INTO app.posts (id) VALUES (1)")
            with threadline.context(actor="user:inner"), threadline.transaction(app):
                app.execute("INSERT INTO app.posts (id) VALUES (2)")
            assert '"outer"' in app.execute(SHOW).fetchone()[0]  # given back
        with threadline.context(actor="user:anonymous"), threadline.transaction(app):
            app.execute("INSERT INTO app.posts (id) VALUES (3)")
            bind_actor("user:late")
            threadline.apply_context(app)

    async def late_actor() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn, aconn.pipeline():
            with threadline.context(actor="user:anonymous"):
                async with threadline.transaction(aconn):
                    await aconn.execute("INSERT INTO app.posts (id) VALUES (4)")
                    bind_actor("user:late-async")
                    await threadline.apply_context_async(aconn)

    asyncio.run(late_actor())
    actors = [r["actor"]["id"] for r in changes(conn)]
    assert actors == ["outer", "outer", "late", "late-async"]


def test_a_thread_sharing_the_connection_never_writes_outside_the_transaction(
    dsn: str, conn: Any, posts: str
) -> None:
    # thread A's client-side-bound statement opens the transaction itself (BEGIN in its own
    # query); a statement of thread B sent meanwhile must still open one, or it would commit alone
    # and survive the rollback below
    with ThreadlineConnection.connect(dsn, cursor_factory=psycopg.ClientCursor) as app:
        building, sent = threading.Event(), threading.Event()
        set_local = app._set_local

        def slow_set_local(ctx: Any) -> bytes:  # thread A, between deciding to send BEGIN and sending it
            building.set()
            assert sent.wait(10)
            return set_local(ctx)

        app._set_local = slow_set_local  # type: ignore[method-assign]

        def thread_a() -> None:
            with threadline.context(actor="user:a"):
                app.execute("INSERT INTO app.posts (id) VALUES (1)")

        a = threading.Thread(target=thread_a)
        a.start()
        assert building.wait(10)
        app.execute("INSERT INTO app.posts (id) VALUES (2)")  # thread B, no context
        sent.set()
        a.join(10)
        app.rollback()
    assert conn.execute("SELECT count(*) FROM app.posts").fetchone() == (0,)


def test_a_context_over_the_carriers_cap_never_fails_the_write(dsn: str, conn: Any, posts: str) -> None:
    # every field within its cap, the whole over max_encoded_bytes (the cap of Celery headers and
    # carriers): the database takes it; over the trigger's own 16 KiB it is recorded as invalid
    big = {"meta": {"m": "x" * 4000}, "job": {"j": "y" * 4000}, "correlation_id": "c" * 256}
    with threadline.context(actor="user:big", **big):
        for i, (autocommit, cursor_factory) in enumerate(
            itertools.product([False, True], [psycopg.Cursor, psycopg.ClientCursor]), start=1
        ):
            with ThreadlineConnection.connect(
                dsn, autocommit=autocommit, cursor_factory=cursor_factory
            ) as app:
                app.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
        with psycopg.connect(dsn) as plain, threadline.transaction(plain):
            plain.execute("INSERT INTO app.posts (id) VALUES (100)")
    previous = threadline.core.fields.limits()
    threadline.core.fields.set_limits(max_meta_bytes=9000, max_encoded_bytes=20000)
    try:
        with (
            threadline.context(actor="user:huge", meta={"m": "x" * 8900}, job={"j": "y" * 8900}),
            ThreadlineConnection.connect(dsn) as app,
        ):
            app.execute("INSERT INTO app.posts (id) VALUES (200)")
    finally:
        threadline.core.fields.set_limits(
            max_meta_bytes=previous.max_meta_bytes, max_encoded_bytes=previous.max_encoded_bytes
        )
    rows = changes(conn)
    assert [r["actor"] for r in rows[:-1]] == [{"type": "user", "id": "big"}] * 5
    assert all(r["meta"] == big["meta"] and r["context_error"] is None for r in rows[:-1])
    assert rows[-1]["actor"] is None and rows[-1]["context_error"] == "context is larger than 16384 bytes"
