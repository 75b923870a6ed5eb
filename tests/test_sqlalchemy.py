"""SQLAlchemy bridge: install(engine), installed(engine), uninstall(engine) for sync and async
engines, Core and ORM sessions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import String, create_engine, insert, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import threadline
from threadline import ActorRef, ConfigurationError
from threadline.propagation import sqlalchemy as tl_sqlalchemy


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    __table_args__ = {"schema": "sa_t"}
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    note: Mapped[str | None]


ROWS_SQL = """
SELECT t.id AS tx, t.actor, t.correlation_id, c.op, c.after->>'name' AS name
  FROM threadline.changes c JOIN threadline.transactions t ON t.id = c.transaction_id
 WHERE c.table_schema = 'sa_t' AND t.id > %s
 ORDER BY c.id
"""


def sa_url(dsn: str, driver: str = "psycopg") -> URL:
    """The SQLAlchemy URL of a libpq DSN (a TCP host, or a socket directory as the embedded server has)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "127.0.0.1")
    socket_dir = host.startswith("/")
    return URL.create(
        f"postgresql+{driver}",
        username=str(info.get("user") or "") or None,
        password=str(info.get("password") or "") or None,
        host=None if socket_dir else host,
        port=int(info["port"]) if info.get("port") else None,
        database=str(info["dbname"]),
        query={"host": host} if socket_dir else {},
    )


@pytest.fixture(scope="module")
def sa_dsn(database: str) -> Iterator[str]:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS sa_t")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sa_t.items (id bigserial PRIMARY KEY, name varchar(100) NOT NULL, note text)"
        )
        threadline.ddl.track(conn, "sa_t.items")
    yield database
    # the session's database is shared: leave no tracked table behind for later modules
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA sa_t CASCADE")


@pytest.fixture(scope="module", params=["server-side binding", "client-side binding"])
def engine(sa_dsn: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    # psycopg's default cursor, and ClientCursor (each transaction's first statement then travels
    # with BEGIN and SET LOCAL in one query)
    args = {"cursor_factory": psycopg.ClientCursor} if request.param == "client-side binding" else {}
    eng = create_engine(sa_url(sa_dsn), pool_size=8, connect_args=args)
    tl_sqlalchemy.install(eng)
    tl_sqlalchemy.install(eng)  # idempotent
    with eng.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        assert isinstance(cursor, psycopg.ClientCursor) == bool(args)
    yield eng
    eng.dispose()


def mark(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM threadline.transactions").fetchone()
        assert row is not None
        return int(row[0])


def rows_since(dsn: str, after: int) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        return conn.cursor(row_factory=dict_row).execute(ROWS_SQL, [after]).fetchall()


def test_core_and_orm_transactions_carry_the_context(engine: Any, sa_dsn: str) -> None:
    start = mark(sa_dsn)
    with threadline.context(actor=ActorRef.user("1"), correlation_id="sa-core"), engine.begin() as conn:
        conn.execute(insert(Item).values(name="core"))
        conn.execute(update(Item).where(Item.name == "core").values(note="n"))
    with threadline.context(actor=ActorRef.user("2"), correlation_id="sa-orm"), Session(engine) as session:
        session.add_all([Item(name="orm1"), Item(name="orm2")])
        session.commit()
        session.add(Item(name="orm3"))  # a second transaction on the same session
        session.commit()
    with Session(engine) as session:  # no context: nothing sent, no actor recorded
        session.add(Item(name="bare"))
        session.commit()
    rows = rows_since(sa_dsn, start)
    got = [(r["op"], r["name"], r["correlation_id"], (r["actor"] or {}).get("id")) for r in rows]
    assert got == [
        ("insert", "core", "sa-core", "1"),
        ("update", "core", "sa-core", "1"),
        ("insert", "orm1", "sa-orm", "2"),
        ("insert", "orm2", "sa-orm", "2"),
        ("insert", "orm3", "sa-orm", "2"),
        ("insert", "bare", None, None),
    ]
    assert len({r["tx"] for r in rows}) == 4


def test_context_set_after_begin_and_savepoint_rollback(engine: Any, sa_dsn: str) -> None:
    start = mark(sa_dsn)
    with Session(engine) as session:
        session.execute(select(1))  # the transaction begins with no context
        with threadline.context(actor=ActorRef.user("late"), correlation_id="sa-late"):
            nested = session.begin_nested()
            session.add(Item(name="rolled-back"))
            session.flush()
            nested.rollback()  # undoes the set_config made inside the savepoint
            session.add(Item(name="kept"))
            session.commit()
    rows = rows_since(sa_dsn, start)
    assert [(r["name"], r["correlation_id"], r["actor"]) for r in rows] == [
        ("kept", "sa-late", {"type": "user", "id": "late"})
    ]


def test_async_engine_core_and_orm_and_no_bleed(sa_dsn: str) -> None:
    start = mark(sa_dsn)

    async def run() -> None:
        eng = create_async_engine(sa_url(sa_dsn), pool_size=10)
        tl_sqlalchemy.install(eng)
        assert tl_sqlalchemy.installed(eng)

        async def one(i: int) -> None:
            with threadline.context(actor=ActorRef.user(f"a{i}"), correlation_id=f"sa-async-{i}"):
                async with AsyncSession(eng) as session:
                    session.add(Item(name=f"async-{i}"))
                    await asyncio.sleep(0.001)
                    await session.flush()
                    await session.execute(text("SELECT pg_sleep(0.005)"))
                    await session.commit()
                async with eng.begin() as conn:
                    await conn.execute(insert(Item).values(name=f"async-core-{i}"))

        try:
            await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await eng.dispose()

    asyncio.run(run())
    rows = rows_since(sa_dsn, start)
    assert len(rows) == 40
    for r in rows:
        i = r["name"].rsplit("-", 1)[1]
        assert r["correlation_id"] == f"sa-async-{i}" and r["actor"] == {"type": "user", "id": f"a{i}"}


def test_refuses_other_drivers_and_uninstruments(sa_dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="postgresql\\+psycopg"):
        tl_sqlalchemy.install(create_engine("sqlite://"))
    with pytest.raises(ConfigurationError):
        tl_sqlalchemy.install(object())
    eng = create_engine(sa_url(sa_dsn))
    tl_sqlalchemy.install(eng)
    tl_sqlalchemy.uninstall(eng)
    assert not tl_sqlalchemy.installed(eng)
    start = mark(sa_dsn)
    with threadline.context(actor=ActorRef.user("x")), eng.begin() as conn:
        conn.execute(insert(Item).values(name="uninstrumented"))
    assert rows_since(sa_dsn, start)[0]["actor"] is None
    eng.dispose()


def test_streamed_query_after_a_context_change_mid_transaction(engine: Any) -> None:
    # the context changes inside a transaction right before a server-side (streamed) query
    from sqlalchemy import text

    with engine.connect() as c, c.begin():
        c.execute(text("SELECT 1"))
        with threadline.context(actor="user:stream"):
            rows = c.execution_options(stream_results=True, max_row_buffer=2).execute(
                text("SELECT g FROM generate_series(1, 5) g")
            )
            assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
            assert c.execute(text("SELECT current_setting('threadline.context', true)")).scalar() == (
                threadline.current().to_json()
            )


def test_sync_engine_bridges_pooled_and_autocommit_connections(sa_dsn: str) -> None:
    eng = create_engine(sa_url(sa_dsn), pool_size=2)
    with eng.connect() as c:  # pooled before install(): replaced when returned
        c.execute(text("SELECT 1"))
        with threadline.context(actor=ActorRef.user("early")):
            tl_sqlalchemy.install(eng)
    start = mark(sa_dsn)
    try:
        with threadline.context(actor=ActorRef.user("ac"), correlation_id="sa-autocommit"):
            with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(insert(Item).values(name="autocommit-1"))
                c.execute(insert(Item).values(name="autocommit-2"))
            with eng.begin() as c:
                c.execute(insert(Item).values(name="in-tx"))
    finally:
        eng.dispose()
    rows = rows_since(sa_dsn, start)
    assert [r["name"] for r in rows] == ["autocommit-1", "autocommit-2", "in-tx"]
    assert all(r["actor"] == {"type": "user", "id": "ac"} for r in rows)
    assert len({r["tx"] for r in rows}) == 3


def test_a_context_that_ends_before_the_commit_leaves_the_session_attributed(
    engine: Any, sa_dsn: str
) -> None:
    start = mark(sa_dsn)
    with Session(engine) as session:
        with threadline.context(actor=ActorRef.user("ended"), correlation_id="sa-ended"):
            session.add(Item(name="sync-ended"))
            session.flush()
        session.execute(select(1))  # no context now: the session's transaction keeps its own
        session.commit()

    async def run() -> None:
        eng = create_async_engine(sa_url(sa_dsn), pool_size=2)
        tl_sqlalchemy.install(eng)
        try:
            async with AsyncSession(eng) as session:
                with threadline.context(actor=ActorRef.user("ended"), correlation_id="sa-ended"):
                    session.add(Item(name="async-ended"))
                    await session.flush()
                await session.execute(text("SELECT 1"))
                await session.commit()
        finally:
            await eng.dispose()

    asyncio.run(run())
    rows = rows_since(sa_dsn, start)
    assert [(r["name"], r["correlation_id"], (r["actor"] or {}).get("id")) for r in rows] == [
        ("sync-ended", "sa-ended", "ended"),
        ("async-ended", "sa-ended", "ended"),
    ]


def test_every_two_phase_transaction_carries_the_context(engine: Any) -> None:
    # SQLAlchemy's psycopg dialect begins them with tpc_begin() on the pooled connection (rolled
    # back here before the prepare: the test server may allow no prepared transactions)
    with threadline.context(actor=ActorRef.user("2pc")), engine.connect() as conn:
        for i in range(3):
            tx = conn.begin_twophase(f"threadline-sa-{uuid.uuid4().hex}")
            seen = conn.exec_driver_sql("SELECT current_setting('threadline.context', true)").scalar()
            assert '"2pc"' in (seen or ""), (i, seen)
            tx.rollback()
