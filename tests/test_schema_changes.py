"""Capture through schema changes: every kind of DDL, with and without the DDL event triggers.

Two databases: one where a superuser installed threadline (event triggers keep typed capture code
in step, inside the DDL's own transaction) and one owned by a role that may not create event
triggers (drift-safe capture code; ``sync`` brings it up to date). Every case runs with plain and
hostile names, and with the DDL and the writes in one transaction or in separate ones. Each case
checks that no write failed, what was captured, that masked and excluded values never reach an
audit row, that history follows a renamed table, the registry statuses, and that pruning leaves no
capture function behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import threadline
from threadline import ddl
from threadline.explore.selection import changed_fields_sql
from threadline.ops import health

from .backends import ADMIN_DSN
from .conftest import changed_before, changes, key_indexes

SECRET_1, SECRET_2 = "4111-1111-1111-1111", "4222-2222-2222-2222"
HIDDEN_1, HIDDEN_2 = "tsvector-one", "tsvector-two"
KEY = {"id": 1, "region": "eu"}


@dataclass(frozen=True)
class Env:
    """A database and a connection to it as the role that owns the tables and the audit schema."""

    mode: str
    conn: psycopg.Connection[Any]


def _make_env(mode: str) -> Generator[Env, None, None]:
    suffix = uuid.uuid4().hex[:8]
    dbname = f"threadline_ddl_{mode}_{suffix}"
    role = f"tl_owner_{suffix}" if mode == "drift_safe" else None
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        if role:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(dbname), sql.Identifier(role or "postgres")
            )
        )
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=dbname, **({"user": role} if role else {}))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ddl.install(conn)
            follows = conn.execute("SELECT threadline.follows_ddl()").fetchone()
            assert follows == ((mode == "typed"),)
            yield Env(mode, conn)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            if role:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module", params=["typed", "drift_safe"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """``typed``: installed by a superuser (event triggers); ``drift_safe``: by a plain owner role."""
    yield from _make_env(request.param)


NAMES = {
    "plain": {
        "schema": "shop",
        "table": "orders",
        "card": "card_number",
        "search": "search",
        "status": "status",
    },
    "hostile": {
        "schema": 'Sch"; ema',
        "table": 'Or"ders; DROP TABLE x; --',
        "card": "Card'No",
        "search": 'Se"arch',
        "status": "$threadline$ St",
    },
}

KINDS = [
    "add_column",
    "drop_column",
    "rename_column",
    "alter_type",
    "rename_table",
    "set_schema",
    "drop_table",
    "readd_hidden_names",
    "rename_masked",
]


class Table:
    """The test table's names, which change as the DDL of a case runs."""

    def __init__(self, names: dict[str, str], tag: str) -> None:
        self.schema = f"{names['schema']}_{tag}"
        self.other_schema = f"{names['schema']}_{tag}_2"
        self.name = names["table"]
        self.card, self.search, self.status = names["card"], names["search"], names["status"]

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified(self) -> str:
        """The ``[schema.]table`` text the Python API accepts (both parts quoted)."""
        return sql.Identifier(self.schema, self.name).as_string(None)


def _q(conn: psycopg.Connection[Any], text: str, *args: Any, params: Any = None) -> None:
    conn.execute(sql.SQL(text).format(*args), params)


def _changes(conn: psycopg.Connection[Any], since: int = 0) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT c.*, "
        + changed_fields_sql(sql.Identifier("threadline")).as_string(conn)
        + " AS changed_fields FROM threadline.changes c"
        " WHERE c.id > %s ORDER BY c.id",
        [since],
    ).fetchall()


def _last_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(id), 0) FROM threadline.changes").fetchone()
    assert row is not None
    return int(row[0])


def _nothing_hidden_leaked(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT count(*) FROM threadline.changes WHERE concat(after::text, before::text, pk::text) ~ %s",
        [f"{SECRET_1}|{SECRET_2}|{HIDDEN_1}|{HIDDEN_2}"],
    ).fetchone()
    assert row == (0,), "a masked or excluded value reached an audit row"


def _no_orphan_functions(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'threadline' AND p.proname ~ '^capture_'"
        "   AND NOT EXISTS (SELECT 1 FROM threadline.tracked_tables t WHERE t.function_name = p.proname)"
    ).fetchone()
    assert row == (0,)


def _status(conn: psycopg.Connection[Any], function_name: str) -> str | None:
    found = [t for t in ddl.tracked_tables(conn) if t.function_name == function_name]
    return found[0].status if found else None


def _ddl(kind: str, t: Table) -> tuple[list[tuple[str, list[sql.Composable]]], dict[str, Any]]:
    """The statements of one DDL kind, and the row values a write after it sets."""
    card, search, status = sql.Identifier(t.card), sql.Identifier(t.search), sql.Identifier(t.status)
    tbl = t.ident
    if kind == "add_column":
        return [("ALTER TABLE {} ADD COLUMN extra int DEFAULT 7", [tbl])], {"extra": 7}
    if kind == "drop_column":
        return [("ALTER TABLE {} DROP COLUMN {}", [tbl, status])], {}
    if kind == "rename_column":
        return [("ALTER TABLE {} RENAME COLUMN {} TO state", [tbl, status])], {"state": "paid"}
    if kind == "alter_type":
        return [("ALTER TABLE {} ALTER COLUMN note TYPE json USING to_json(note)", [tbl])], {"note": "n"}
    if kind == "rename_table":
        return [("ALTER TABLE {} RENAME TO {}", [tbl, sql.Identifier(t.name + "_v2")])], {}
    if kind == "set_schema":
        return [
            ("CREATE SCHEMA {}", [sql.Identifier(t.other_schema)]),
            ("ALTER TABLE {} SET SCHEMA {}", [tbl, sql.Identifier(t.other_schema)]),
        ], {}
    if kind == "drop_table":
        return [("DROP TABLE {}", [tbl])], {}
    if kind == "readd_hidden_names":
        return [
            ("ALTER TABLE {} DROP COLUMN {}", [tbl, card]),
            ("ALTER TABLE {} DROP COLUMN {}", [tbl, search]),
            ("ALTER TABLE {} ADD COLUMN {} text", [tbl, card]),
            ("ALTER TABLE {} ADD COLUMN {} text", [tbl, search]),
        ], {}
    if kind == "rename_masked":
        return [
            ("ALTER TABLE {} RENAME COLUMN {} TO {}", [tbl, card, sql.Identifier(t.card + " renamed")])
        ], {}
    raise AssertionError(kind)


def _after_ddl(kind: str, t: Table) -> None:
    if kind == "rename_table":
        t.name = t.name + "_v2"
    elif kind == "set_schema":
        t.schema = t.other_schema
    elif kind == "rename_masked":
        t.card = t.card + " renamed"


@pytest.mark.parametrize("names", list(NAMES), ids=list(NAMES))
@pytest.mark.parametrize("in_tx", [True, False], ids=["same_tx", "separate"])
@pytest.mark.parametrize("kind", KINDS)
def test_ddl_never_breaks_a_write_nor_leaks_nor_loses_history(
    env: Env, kind: str, in_tx: bool, names: str
) -> None:
    conn = env.conn
    t = Table(NAMES[names], uuid.uuid4().hex[:6])
    old_qualified = t.qualified
    _q(conn, "CREATE SCHEMA {}", sql.Identifier(t.schema))
    _q(
        conn,
        "CREATE TABLE {} (id int, region text, {} text, {} text, {} text, note text, qty int,"
        " PRIMARY KEY (id, region))",
        t.ident,
        sql.Identifier(t.card),
        sql.Identifier(t.search),
        sql.Identifier(t.status),
    )
    result = ddl.track(conn, t.qualified, mask=[t.card], exclude=[t.search])
    assert result.mode == env.mode and result.mask == (t.card,) and result.exclude == (t.search,)
    fn = conn.execute(
        "SELECT function_name FROM threadline.tracked_tables WHERE relid = %s::regclass", [t.qualified]
    ).fetchone()[0]  # type: ignore[index]
    _q(
        conn,
        "INSERT INTO {} VALUES (1, 'eu', %s, %s, 'new', 'n', 1)",
        t.ident,
        params=[SECRET_1, HIDDEN_1],
    )
    _q(conn, "UPDATE {} SET {} = 'paid' WHERE id = 1", t.ident, sql.Identifier(t.status))
    before_ddl = _last_id(conn)

    statements, extra = _ddl(kind, t)
    with conn.transaction() if in_tx else nullcontext():
        for text, args in statements:
            _q(conn, text, *args)
        _after_ddl(kind, t)
        if kind != "drop_table":
            # writes right after the DDL (in its transaction when in_tx): none may fail
            _q(conn, "UPDATE {} SET qty = qty + 1 WHERE id = 1", t.ident)
            _q(conn, "UPDATE {} SET {} = %s WHERE id = 1", t.ident, sql.Identifier(t.card), params=[SECRET_2])
            _q(
                conn,
                "UPDATE {} SET {} = %s WHERE id = 1",
                t.ident,
                sql.Identifier(t.search),
                params=[HIDDEN_2],
            )
            _q(conn, "INSERT INTO {} (id, region, qty) VALUES (2, 'us', 5)", t.ident)
            _q(conn, "DELETE FROM {} WHERE id = 2", t.ident)
    _nothing_hidden_leaked(conn)

    if kind == "drop_table":
        expected = None if env.mode == "typed" else "orphaned"
        assert _status(conn, fn) == expected
        actions = ddl.sync(conn)
        assert _status(conn, fn) is None
        if env.mode == "drift_safe":
            assert "pruned" in {a.action for a in actions}
        _no_orphan_functions(conn)
        return

    after = _changes(conn, before_ddl)
    assert [c["op"] for c in after] == ["update", "update", "insert", "delete"]
    assert {(c["table_schema"], c["table_name"]) for c in after} == {(t.schema, t.name)}
    qty_update, card_update, _insert, delete = after
    # drift-safe code before a sync: a masked column that was renamed away takes every value of
    # the row with it (nothing can be trusted by name), and columns it does not know are masked
    everything_masked = env.mode == "drift_safe" and kind in ("rename_masked", "readd_hidden_names")
    if everything_masked:
        for change in after:
            for image in (change["after"], change["before"], change["pk"]):
                assert image is None or set(image.values()) == {"[masked]"}, change
    else:
        assert qty_update["pk"] == KEY and qty_update["changed_fields"] == ["qty"]
        assert qty_update["before"]["qty"] == 1 and qty_update["after"]["qty"] == 2
        if env.mode == "typed":
            assert changed_before(qty_update) == {"qty": 1}
        else:  # until synced, unchanged values of columns added or renamed since may be there too
            assert set(qty_update["changed_fields"]) <= {"qty", *extra}
        image = qty_update["after"]
        assert t.search not in image and image[t.card] == "[masked]"
        assert card_update["after"][t.card] == "[masked]"
        assert card_update["changed_fields"] == [t.card]
        assert card_update["before"][t.card] == "[masked]"
        if env.mode == "typed":
            assert changed_before(card_update) == {t.card: "[masked]"}
        if kind == "drop_column":
            assert t.status not in image
        for column, value in extra.items():
            assert image[column] == value
        assert delete["before"]["qty"] == 5 and delete["pk"] == {"id": 2, "region": "us"}

        # history under the table's name now, and under its old name, is the whole story of row 1
        story = threadline.history(conn, t.qualified, KEY)
        assert [c.op for c in reversed(story)] == ["insert", "update", "update", "update"]
        assert threadline.history(conn, old_qualified, KEY) == story

    status = _status(conn, fn)
    # drift-safe code knows the masked names, and which columns may hold json (note becomes json)
    if env.mode == "typed":
        assert status == "installed"
    else:
        assert status == "outdated"
        assert next(t2.restore_command() for t2 in ddl.tracked_tables(conn) if t2.function_name == fn)
        ddl.sync(conn)
        assert _status(conn, fn) == "installed"
        mark = _last_id(conn)
        _q(
            conn,
            "UPDATE {} SET {} = %s, qty = 9 WHERE id = 1",
            t.ident,
            sql.Identifier(t.card),
            params=[SECRET_1],
        )
        (synced,) = _changes(conn, mark)
        assert set(synced["changed_fields"]) == {t.card, "qty"}
        assert synced["after"][t.card] == "[masked]" and synced["pk"] == KEY
        for column, value in extra.items():  # known since the sync: recorded in clear
            assert synced["after"][column] == value
        history = [c.op for c in reversed(threadline.history(conn, t.qualified, KEY))]
        assert history[:2] == ["insert", "update"] and history[-1] == "update"
    # options persist: tracking again without options keeps the mask and the exclusion
    again = ddl.track(conn, t.qualified)
    assert t.card in again.mask and t.search in again.exclude
    _nothing_hidden_leaked(conn)
    ddl.sync(conn)
    _no_orphan_functions(conn)


def test_partitions_attach_and_detach(env: Env) -> None:
    conn = env.conn
    s = f"part_{uuid.uuid4().hex[:6]}"
    _q(conn, "CREATE SCHEMA {}", sql.Identifier(s))
    conn.execute(
        f"CREATE TABLE {s}.events (id int, at date, body text, token text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)"
    )
    conn.execute(
        f"CREATE TABLE {s}.events_2020 PARTITION OF {s}.events FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')"
    )
    conn.execute(f"CREATE TABLE {s}.events_2021 (LIKE {s}.events INCLUDING ALL)")
    ddl.track(conn, f"{s}.events", mask=["token"])
    for in_tx in (True, False):
        with conn.transaction() if in_tx else nullcontext():
            conn.execute(
                f"ALTER TABLE {s}.events ATTACH PARTITION {s}.events_2021 FOR VALUES FROM ('2021-01-01') TO ('2022-01-01')"
            )
            conn.execute(f"INSERT INTO {s}.events VALUES (1, '2021-03-01', 'a', %s)", [SECRET_1])
            conn.execute(f"UPDATE {s}.events SET body = 'b' WHERE id = 1")
            conn.execute(f"ALTER TABLE {s}.events DETACH PARTITION {s}.events_2021")
            conn.execute(f"UPDATE {s}.events_2021 SET body = 'c' WHERE id = 1")  # not part of events now
            conn.execute(f"DELETE FROM {s}.events_2021")
    rows = [c for c in _changes(conn) if c["table_schema"] == s]
    assert [(c["table_name"], c["op"]) for c in rows] == [("events", "insert"), ("events", "update")] * 2
    assert all(c["after"]["token"] == "[masked]" for c in rows)
    assert {t.status for t in ddl.tracked_tables(conn) if t.table_schema == s} == {"installed"}
    _nothing_hidden_leaked(conn)


def test_retracking_never_unmasks_and_changes_are_explicit(env: Env) -> None:
    conn = env.conn
    s = f"opts_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, card_number text, note text, api_key text)")
    first = ddl.track(conn, f"{s}.orders", mask=["card_number"])
    assert first.action == "tracked" and first.previous_mask is None
    assert first.unprotected == ("api_key",)  # looks secret, neither masked nor excluded
    again = ddl.track(conn, f"{s}.orders")  # what the docs say to run after a column change
    assert again.mask == ("card_number",) and again.previous_mask == ("card_number",)
    assert not again.options_changed
    more = ddl.track(conn, f"{s}.orders", exclude=["api_key"])
    assert (more.previous_exclude, more.exclude) == ((), ("api_key",)) and more.options_changed
    assert more.mask == ("card_number",) and more.unprotected == ()
    with pytest.raises(threadline.core.errors.InvalidTrackOption, match="cannot unmask note: not masked"):
        ddl.track(conn, f"{s}.orders", unmask=["note"])
    with pytest.raises(threadline.core.errors.InvalidTrackOption, match="look secret"):
        ddl.track(conn, f"{s}.orders", include=["api_key"], strict=True)
    assert ddl.track(conn, f"{s}.orders").exclude == ("api_key",)  # the refused call changed nothing
    conn.execute(f"INSERT INTO {s}.orders VALUES (1, 'visible-after-unmask', 'n', 'k')")
    unmasked = ddl.track(conn, f"{s}.orders", unmask=["card_number"])
    assert unmasked.mask == () and unmasked.previous_mask == ("card_number",)
    conn.execute(f"UPDATE {s}.orders SET card_number = 'now-visible' WHERE id = 1")
    last = _changes(conn)[-1]
    assert last["after"]["card_number"] == "now-visible" and "api_key" not in last["after"]
    # the SQL API is the same path: options given there persist too
    conn.execute(f"SELECT * FROM threadline.track('{s}.orders', mask => ARRAY['note'])")
    assert ddl.track(conn, f"{s}.orders").mask == ("note",)


def test_untrack_by_new_name_removes_the_function_and_old_name_says_where(env: Env) -> None:
    conn = env.conn
    s = f"ren_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, v int)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"INSERT INTO {s}.orders VALUES (2, 1)")
    conn.execute(f"ALTER TABLE {s}.orders RENAME TO orders_v2")
    conn.execute(f"UPDATE {s}.orders_v2 SET v = 2")
    assert [c.op for c in threadline.history(conn, f"{s}.orders_v2", 2)] == ["update", "insert"]
    with pytest.raises(threadline.core.errors.UnknownTable, match=r"renamed to .*orders_v2"):
        ddl.untrack(conn, f"{s}.orders")
    assert ddl.untrack(conn, f"{s}.orders_v2")
    assert not [t for t in ddl.tracked_tables(conn) if t.table_schema == s]
    _no_orphan_functions(conn)
    conn.execute(f"UPDATE {s}.orders_v2 SET v = 3")  # no longer captured, and nothing fails
    assert len(threadline.history(conn, f"{s}.orders_v2", 2)) == 2


def test_coverage_gates_on_drift_and_orphans(env: Env) -> None:
    conn = env.conn
    s = f"cov_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.a (id int PRIMARY KEY, v int)")
    conn.execute(f"CREATE TABLE {s}.b (id int PRIMARY KEY, v int)")
    ddl.track(conn, f"{s}.a")
    ddl.track(conn, f"{s}.b")
    conn.execute(f"ALTER TABLE {s}.a ADD COLUMN w int")
    conn.execute(f"DROP TABLE {s}.b")
    report = health.coverage(conn, schemas=[s])
    statuses = {t.table_name: t.status for t in report.tables}
    if env.mode == "typed":
        assert statuses == {"a": "installed"} and report.ok
    else:
        # a's drift-safe code reads columns by name from the row's image: a new column needs no
        # new code (only a table with masked or excluded columns lists its columns)
        assert statuses == {"a": "installed", "b": "orphaned"} and not report.ok
        assert any("threadline sync" in p for p in report.problems)
        ddl.sync(conn)
        report = health.coverage(conn, schemas=[s])
        assert {t.table_name: t.status for t in report.tables} == {"a": "installed"} and report.ok
    _no_orphan_functions(conn)


def test_a_dropped_key_column_never_fails_a_write(env: Env) -> None:
    conn = env.conn
    s = f"key_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.t (code text, id int PRIMARY KEY, v int)")
    ddl.track(conn, f"{s}.t", keys=["code"])
    conn.execute(f"INSERT INTO {s}.t VALUES ('x', 1, 1)")
    conn.execute(f"ALTER TABLE {s}.t DROP COLUMN code")
    conn.execute(f"UPDATE {s}.t SET v = 2")  # the write succeeds; its key is unknown now
    last = _changes(conn)[-1]
    assert last["op"] == "update" and last["pk"] == {"code": None}
    (entry,) = [t for t in ddl.tracked_tables(conn) if t.table_schema == s]
    assert entry.status == "outdated" and "code" in (entry.detail or "")
    ddl.track(conn, f"{s}.t", keys=[])  # back to the primary key
    conn.execute(f"UPDATE {s}.t SET v = 3")
    assert _changes(conn)[-1]["pk"] == {"id": 1}
    assert _changes(conn)[-1]["after"] == {"id": 1, "v": 3}


# ---------------------------------------------------------------------------------------------
# Upgrades, pinned SQL and the command line

FIXTURES = Path(__file__).parent / "fixtures"

# The rendered version-7 script for the default schema: a migration that embeds
# install_sql(version=7) must produce these exact bytes in every later release.
PINNED_V7 = "3dffc0ada0149881d29ad0ad6fd0f68acd6bc2c710f4b2526866cd86faee6621"


def test_upgrade_from_version_6_adopts_tracked_tables_with_their_options(env: Env) -> None:
    conn = env.conn
    if env.mode != "typed":
        pytest.skip("the version-6 fixture is applied as a superuser")
    conn.execute((FIXTURES / "schema_v6_with_tracked_table.sql").read_bytes())
    try:
        conn.execute("INSERT INTO old_app.orders VALUES (9, %s, 'n', %s)", [SECRET_1, HIDDEN_1])
        conn.execute("TRUNCATE old_app.orders")
        conn.execute("DELETE FROM audit_old.changes WHERE op = 'insert'")
        conn.execute("INSERT INTO old_app.orders VALUES (1, %s, 'n', %s)", [SECRET_1, HIDDEN_1])
        result = ddl.install(conn, "audit_old")
        assert (result.previous_version, result.version) == (6, 7)
        # the truncate that version 6 captured is entered in truncates; the partial index is gone
        entry = conn.execute(
            "SELECT x.table_schema, x.table_name, x.captured_at = c.captured_at FROM audit_old.truncates x"
            " JOIN audit_old.changes c ON c.transaction_id = x.transaction_id AND c.id = x.change_id"
        ).fetchall()
        assert entry == [("old_app", "orders", True)]
        assert conn.execute("SELECT to_regclass('audit_old.changes_truncate_idx')").fetchone() == (None,)
        conn.execute("DELETE FROM audit_old.truncates")
        conn.execute("DELETE FROM audit_old.changes WHERE op = 'truncate'")
        (entry,) = ddl.tracked_tables(conn, "audit_old")
        assert (entry.table_name, entry.mask, entry.exclude, entry.status) == (
            "orders",
            ("card",),
            ("search",),
            "installed",
        )
        # the old comment is no longer the configuration, and the options persist on re-track
        again = ddl.track(conn, "old_app.orders", audit_schema="audit_old")
        assert again.mask == ("card",) and again.exclude == ("search",)
        conn.execute("ALTER TABLE old_app.orders DROP COLUMN note")
        conn.execute("UPDATE old_app.orders SET card = %s", [SECRET_2])
        rows = conn.execute("SELECT op, after FROM audit_old.changes ORDER BY id").fetchall()
        assert [r[0] for r in rows] == ["insert", "update"]
        assert rows[1][1] == {"id": 1, "card": "[masked]"}
        assert SECRET_1 not in str(rows) and HIDDEN_1 not in str(rows)
        # an upgraded schema keeps its jsonb images; capture fills them, and readers derive the
        # changed fields of a table without masks from them
        types = conn.execute(
            "SELECT array_agg(format_type(atttypid, atttypmod) ORDER BY attname) FROM pg_attribute"
            " WHERE attrelid = 'audit_old.changes'::regclass AND attname IN ('after', 'before')"
        ).fetchone()
        assert types == (["jsonb", "jsonb"],)
        # the hash index on pk gave way to the btree on its hash
        assert key_indexes(conn, "audit_old") == ["changes_key_idx btree"]
        conn.execute("CREATE TABLE old_app.plain (id int PRIMARY KEY, a int, b text)")
        ddl.track(conn, "old_app.plain", audit_schema="audit_old")
        conn.execute("INSERT INTO old_app.plain VALUES (1, 1, 'x')")
        conn.execute("UPDATE old_app.plain SET b = 'y'")
        (update, insert) = threadline.history(conn, "old_app.plain", 1, audit_schema="audit_old")
        assert (update.op, update.changed_fields, update.before) == (
            "update",
            ("b",),
            {"id": 1, "a": 1, "b": "x"},
        )
        assert insert.op == "insert" and insert.after == {"id": 1, "a": 1, "b": "x"}
        (card_update, _) = threadline.history(conn, "old_app.orders", 1, audit_schema="audit_old")
        assert card_update.changed_fields == ("card",)
    finally:
        conn.execute("DROP SCHEMA old_app CASCADE")
        conn.execute("DROP SCHEMA audit_old CASCADE")


def test_pinned_install_sql_never_changes() -> None:
    text = ddl.install_sql(version=7)
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == PINNED_V7, (
        "the version-7 install script changed: pinned scripts are frozen; put changes in a new version"
    )
    other = ddl.install_sql("audit", version=7)
    assert '"audit".' in other and '"threadline".' not in other
    with pytest.raises(threadline.core.errors.SchemaError, match="no pinned install script"):
        ddl.install_sql(version=6)


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threadline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "THREADLINE_DSN": dsn},
        timeout=60,
    )


def test_cli_track_sync_untrack_with_a_hostile_name(env: Env) -> None:
    conn = env.conn
    dsn = conn.info.dsn
    schema = f'Sch"; ema_{uuid.uuid4().hex[:6]}'
    table = sql.Identifier(schema, 'Or"ders; --')
    _q(conn, "CREATE SCHEMA {}", sql.Identifier(schema))
    _q(conn, 'CREATE TABLE {} (id int PRIMARY KEY, "Card\'No" text, password text)', table)
    name = table.as_string(None)
    res = _cli("track", name, "--mask", "Card'No", "--strict", dsn=dsn)
    assert res.returncode == 2 and "look secret" in res.stderr and "password" in res.stderr
    res = _cli("track", name, "--mask", "Card'No", dsn=dsn)
    assert res.returncode == 0, res.stderr
    assert "mask: Card'No" in res.stdout and "password" in res.stderr
    res = _cli("track", name, "--exclude", "password", dsn=dsn)
    assert "exclude: - -> password" in res.stdout and "mask: Card'No" in res.stdout
    assert _cli("sync", "--check", dsn=dsn).returncode == 0
    _q(conn, "ALTER TABLE {} ADD COLUMN extra int", table)
    check = _cli("sync", "--check", dsn=dsn)
    if env.mode == "typed":
        assert check.returncode == 0
    else:
        assert check.returncode == 1 and "outdated" in check.stdout
        cov = _cli("coverage", "--table-schema", schema, dsn=dsn)
        assert cov.returncode == 1 and "run: threadline track" in cov.stdout
        assert "regenerated" in _cli("sync", dsn=dsn).stdout
        assert _cli("sync", "--check", dsn=dsn).returncode == 0
    _q(conn, "DROP TABLE {}", table)
    res = _cli("untrack", "--prune", dsn=dsn)
    assert res.returncode == 0
    assert ("pruned" in res.stdout) == (env.mode == "drift_safe")
    _no_orphan_functions(conn)
    assert _cli("untrack", dsn=dsn).returncode == 2  # neither a table nor --prune


def test_a_superuser_install_adds_the_event_triggers_and_types_the_code() -> None:
    env = _make_env("drift_safe")
    drift = next(env)
    try:
        conn = drift.conn
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, card text)")
        assert ddl.track(conn, "public.orders", mask=["card"]).mode == "drift_safe"
        dbname = conn.info.dbname
        with psycopg.connect(psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=dbname), autocommit=True) as su:
            result = ddl.install(su)
            assert result.follows_ddl and not result.changed
        (entry,) = ddl.tracked_tables(conn)
        assert (entry.mode, entry.status, entry.mask) == ("typed", "installed", ("card",))
        conn.execute("ALTER TABLE public.orders ADD COLUMN extra int")  # the owner's DDL is followed
        assert ddl.tracked_tables(conn)[0].status == "installed"
    finally:
        env.close()


def test_dump_and_restore_keep_tracking(env: Env) -> None:
    if env.mode != "typed":
        pytest.skip("dumped and restored as a superuser")
    pg_dump, pg_restore = shutil.which("pg_dump"), shutil.which("pg_restore")
    if not pg_dump or not pg_restore:
        pytest.skip("pg_dump and pg_restore are not installed")
    conn = env.conn
    tools = int(
        re.search(r"(\d+)", subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout)[1]
    )
    server = conn.info.server_version // 10000
    if tools < server:
        pytest.skip(f"pg_dump {tools} cannot dump a PostgreSQL {server} server")
    s = f"dump_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, card text, note text)")
    ddl.track(conn, f"{s}.orders", mask=["card"])
    conn.execute(f"INSERT INTO {s}.orders VALUES (1, %s, 'n')", [SECRET_1])
    target = f"threadline_restore_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    try:
        source = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=conn.info.dbname)
        dest = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=target)
        dump = subprocess.run([pg_dump, "-Fc", "-d", source], capture_output=True, check=True).stdout
        restored = subprocess.run(
            [pg_restore, "--exit-on-error", "-d", dest], input=dump, capture_output=True
        )
        assert restored.returncode == 0, restored.stderr.decode()
        with psycopg.connect(dest, autocommit=True) as copy:
            statuses = {t.table_name: t.status for t in ddl.tracked_tables(copy) if t.table_schema == s}
            assert statuses == {"orders": "installed"}
            copy.execute(f"UPDATE {s}.orders SET card = %s, note = 'm'", [SECRET_2])
            copy.execute(f"ALTER TABLE {s}.orders RENAME TO orders_v2")
            copy.execute(f"UPDATE {s}.orders_v2 SET note = 'o'")
            story = threadline.history(copy, f"{s}.orders_v2", 1)
            assert [c.op for c in story] == ["update", "update", "insert"]
            assert story[1].after == {"id": 1, "card": "[masked]", "note": "m"}
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target)))


def test_a_column_dropped_with_its_type_never_fails_a_write(env: Env) -> None:
    conn = env.conn
    s = f"dom_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE DOMAIN {s}.amount AS numeric CHECK (VALUE >= 0)")
    conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, total {s}.amount, v int)")
    ddl.track(conn, f"{s}.t")
    conn.execute(f"INSERT INTO {s}.t VALUES (1, 5, 1)")
    conn.execute(f"DROP DOMAIN {s}.amount CASCADE")  # drops the column, without an ALTER TABLE
    conn.execute(f"UPDATE {s}.t SET v = 2")
    assert _changes(conn)[-1]["after"] == {"id": 1, "v": 2}
    # typed code followed the drop; drift-safe code of a table without masks or excludes reads the
    # row by name, so it needed no new code
    assert [t.status for t in ddl.tracked_tables(conn) if t.table_schema == s] == ["installed"]


def test_a_new_table_with_a_renamed_tables_old_name_gets_its_own_capture(env: Env) -> None:
    conn = env.conn
    s = f"reuse_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, a int)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"ALTER TABLE {s}.orders RENAME TO orders_old")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, b text)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"INSERT INTO {s}.orders_old VALUES (1, 1)")
    conn.execute(f"INSERT INTO {s}.orders VALUES (1, 'x')")
    conn.execute(f"UPDATE {s}.orders_old SET a = 2")
    conn.execute(f"UPDATE {s}.orders SET b = 'y'")
    rows = [(c["table_name"], c["op"], c["after"]) for c in _changes(conn) if c["table_schema"] == s]
    assert rows == [
        ("orders_old", "insert", {"id": 1, "a": 1}),
        ("orders", "insert", {"id": 1, "b": "x"}),
        ("orders_old", "update", {"id": 1, "a": 2}),
        ("orders", "update", {"id": 1, "b": "y"}),
    ]
    entries = [t for t in ddl.tracked_tables(conn) if t.table_schema == s]
    assert len({t.function_name for t in entries}) == 2
    ddl.sync(conn)
    assert {t.status for t in ddl.tracked_tables(conn) if t.table_schema == s} == {"installed"}


def test_timeline_and_as_of_follow_a_renamed_and_moved_table(env: Env) -> None:
    conn = env.conn
    s = f"story_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE SCHEMA {s}_archive")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, status text)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"INSERT INTO {s}.orders VALUES (7, 'new')")
    (before_rename,) = conn.execute("SELECT clock_timestamp()").fetchone()  # type: ignore[misc]
    conn.execute(f"ALTER TABLE {s}.orders RENAME TO orders_v2")
    conn.execute(f"UPDATE {s}.orders_v2 SET status = 'paid'")
    conn.execute(f"ALTER TABLE {s}.orders_v2 SET SCHEMA {s}_archive")
    conn.execute(f"UPDATE {s}_archive.orders_v2 SET status = 'shipped'")
    for name in (f"{s}_archive.orders_v2", f"{s}.orders_v2", f"{s}.orders"):
        page = threadline.timeline(conn, table=name)
        assert [(c.table_schema, c.table_name, c.op) for c in page.changes] == [
            (s, "orders", "insert"),
            (s, "orders_v2", "update"),
            (f"{s}_archive", "orders_v2", "update"),
        ]
        assert threadline.as_of(conn, name, 7, at=before_rename) == {"id": 7, "status": "new"}
        assert threadline.as_of(conn, name, 7, at=datetime.now(timezone.utc))["status"] == "shipped"


def test_shown_names_are_quoted_so_they_are_never_ambiguous(env: Env) -> None:
    conn = env.conn
    schema = f"MiXeD.Case_{uuid.uuid4().hex[:4]}"
    table = sql.Identifier(schema, "Or.ders")
    _q(conn, "CREATE SCHEMA {}", sql.Identifier(schema))
    _q(conn, "CREATE TABLE {} (id int PRIMARY KEY)", table)
    ddl.track(conn, table.as_string(None))
    shown = f'"{schema}"."Or.ders"'
    (cov,) = [t for t in health.trigger_coverage(conn, schemas=[schema])]
    assert cov.name == shown
    res = _cli("coverage", "--table-schema", schema, dsn=conn.info.dsn)
    assert shown in res.stdout
    res = _cli("track", shown, dsn=conn.info.dsn)
    assert res.returncode == 0 and shown in res.stdout


# ---------------------------------------------------------------------------------------------
# Sequences that once let a masked value through or failed a write


def _fresh(conn: psycopg.Connection[Any], ddl_text: str) -> str:
    s = f"probe_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(ddl_text.format(s=s))
    return s


def _rows_of(conn: psycopg.Connection[Any], s: str) -> list[dict[str, Any]]:
    return [c for c in _changes(conn) if c["table_schema"] == s]


def test_a_masked_column_renamed_away_and_its_name_reused_never_leaks(env: Env) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.acct (id int PRIMARY KEY, note text, secret text)")
    ddl.track(conn, f"{s}.acct", mask=["secret"])
    conn.execute(f"INSERT INTO {s}.acct VALUES (1, 'n', %s)", [SECRET_1])
    conn.execute(f"ALTER TABLE {s}.acct RENAME COLUMN secret TO secret_old")
    conn.execute(f"ALTER TABLE {s}.acct ADD COLUMN secret text")
    conn.execute(f"INSERT INTO {s}.acct VALUES (2, 'b', %s, 'x')", [SECRET_2])
    conn.execute(f"UPDATE {s}.acct SET secret_old = %s WHERE id = 1", [SECRET_2])
    # and a masked column renamed to the old name of another (known) column
    conn.execute(f"ALTER TABLE {s}.acct RENAME COLUMN note TO note2")
    conn.execute(f"ALTER TABLE {s}.acct RENAME COLUMN secret_old TO note")
    conn.execute(f"INSERT INTO {s}.acct (id, note2, note) VALUES (3, 'c', %s)", [SECRET_1])
    conn.execute(f"UPDATE {s}.acct SET note = %s WHERE id = 3", [SECRET_2])
    _nothing_hidden_leaked(conn)
    ddl.sync(conn)
    conn.execute(f"UPDATE {s}.acct SET note = %s, note2 = 'd' WHERE id = 3", [SECRET_1])
    _nothing_hidden_leaked(conn)
    assert _rows_of(conn, s)[-1]["after"]["note2"] == "d"


def test_a_masked_column_renamed_to_the_key_never_reaches_pk(env: Env) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.acct (id int PRIMARY KEY, secret text)")
    ddl.track(conn, f"{s}.acct", mask=["secret"])
    conn.execute(f"ALTER TABLE {s}.acct RENAME COLUMN id TO id_old")
    conn.execute(f"ALTER TABLE {s}.acct RENAME COLUMN secret TO id")
    conn.execute(f"INSERT INTO {s}.acct VALUES (3, %s)", [SECRET_1])
    _nothing_hidden_leaked(conn)
    ddl.sync(conn)
    conn.execute(f"UPDATE {s}.acct SET id = %s", [SECRET_2])
    _nothing_hidden_leaked(conn)
    assert _rows_of(conn, s)[-1]["pk"] == {"id_old": 3}


def test_a_primary_key_moved_onto_a_masked_column_is_recorded_masked(env: Env) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.pkm (id int PRIMARY KEY, ssn text UNIQUE NOT NULL)")
    ddl.track(conn, f"{s}.pkm", mask=["ssn"])
    conn.execute(f"ALTER TABLE {s}.pkm DROP CONSTRAINT pkm_pkey")
    conn.execute(f"ALTER TABLE {s}.pkm ADD PRIMARY KEY (ssn)")
    ddl.sync(conn)
    conn.execute(f"INSERT INTO {s}.pkm VALUES (1, %s)", [SECRET_1])
    _nothing_hidden_leaked(conn)
    assert _rows_of(conn, s)[-1]["pk"] == {"ssn": "[masked]"}
    (entry,) = [t for t in ddl.tracked_tables(conn) if t.table_schema == s]
    assert entry.status == "outdated" and "masked or excluded" in (entry.detail or "")


def test_swapped_column_names_keep_keys_and_masks_on_their_columns(env: Env) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.sw (a int NOT NULL, b text)")
    ddl.track(conn, f"{s}.sw", keys=["a"], mask=["b"])
    conn.execute(f"ALTER TABLE {s}.sw RENAME COLUMN a TO tmp")
    conn.execute(f"ALTER TABLE {s}.sw RENAME COLUMN b TO a")
    conn.execute(f"ALTER TABLE {s}.sw RENAME COLUMN tmp TO b")
    ddl.sync(conn)
    (entry,) = [t for t in ddl.tracked_tables(conn) if t.table_schema == s]
    assert entry.keys == ("b",) and "a" in entry.mask
    conn.execute(f"INSERT INTO {s}.sw (b, a) VALUES (1, %s)", [SECRET_1])
    _nothing_hidden_leaked(conn)
    assert _rows_of(conn, s)[-1]["pk"] == {"b": 1}


@pytest.mark.parametrize(
    "setup, change, write",
    [
        (
            "CREATE TABLE {s}.par (id int PRIMARY KEY, v int, w int);"
            " CREATE TABLE {s}.t (PRIMARY KEY (id)) INHERITS ({s}.par)",
            "ALTER TABLE {s}.par RENAME COLUMN v TO v2",
            "INSERT INTO {s}.t VALUES (1, 1, 1); UPDATE {s}.t SET v2 = 5",
        ),
        (
            "CREATE TABLE {s}.par (id int PRIMARY KEY, v int, w int);"
            " CREATE TABLE {s}.t (PRIMARY KEY (id)) INHERITS ({s}.par)",
            "ALTER TABLE {s}.par ALTER COLUMN w TYPE json USING to_json(w)",
            "INSERT INTO {s}.t VALUES (1, 1, '1'); UPDATE {s}.t SET w = '2'",
        ),
        (
            "CREATE TABLE {s}.pp (id int, v int, PRIMARY KEY (id)) PARTITION BY RANGE (id);"
            " CREATE TABLE {s}.t PARTITION OF {s}.pp FOR VALUES FROM (0) TO (100)",
            "ALTER TABLE {s}.pp RENAME COLUMN v TO v2",
            "INSERT INTO {s}.t VALUES (1, 1); UPDATE {s}.t SET v2 = 5",
        ),
        (
            "CREATE TYPE {s}.person AS (id int, name text); CREATE TABLE {s}.t OF {s}.person (PRIMARY KEY (id))",
            "ALTER TYPE {s}.person RENAME ATTRIBUTE name TO full_name CASCADE",
            "INSERT INTO {s}.t VALUES (1, 'a'); UPDATE {s}.t SET full_name = 'b'",
        ),
        (
            "CREATE TABLE {s}.t (id int PRIMARY KEY, v int)",
            "ALTER VIEW {s}.t RENAME COLUMN v TO v2",
            "INSERT INTO {s}.t VALUES (1, 1); UPDATE {s}.t SET v2 = 5",
        ),
        (
            "CREATE TABLE {s}.t (id int PRIMARY KEY, v int)",
            "ALTER INDEX {s}.t RENAME TO t2; ALTER INDEX {s}.t2 RENAME TO t",  # renames through ALTER INDEX
            "INSERT INTO {s}.t VALUES (1, 1); UPDATE {s}.t SET v = 5",
        ),
    ],
    ids=[
        "inherited-rename",
        "inherited-retype",
        "partition-rename",
        "typed-table",
        "alter-view",
        "alter-index",
    ],
)
def test_ddl_that_reaches_a_tracked_table_indirectly_never_breaks_a_write(
    env: Env, setup: str, change: str, write: str
) -> None:
    conn = env.conn
    s = _fresh(conn, setup)
    ddl.track(conn, f"{s}.t")
    conn.execute(change.format(s=s))
    conn.execute(write.format(s=s))  # must not fail
    assert [c["op"] for c in _rows_of(conn, s)] == ["insert", "update"]
    expected = "installed" if env.mode == "typed" else {"installed", "outdated"}
    status = next(t.status for t in ddl.tracked_tables(conn) if t.table_schema == s and t.table_name == "t")
    assert status == expected if isinstance(expected, str) else status in expected


@pytest.mark.parametrize("column", ["threadline row", "threadline rn", "threadline new", "j", "rn"])
def test_a_column_named_like_the_capture_codes_own_aliases_never_breaks_a_write(
    env: Env, column: str
) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.rz (id int PRIMARY KEY, v text)")
    ddl.track(conn, f"{s}.rz")
    _q(conn, "ALTER TABLE {} ADD COLUMN {} int", sql.Identifier(s, "rz"), sql.Identifier(column))
    _q(conn, "INSERT INTO {} VALUES (2, 's2', 5)", sql.Identifier(s, "rz"))
    _q(conn, "UPDATE {} SET {} = 6", sql.Identifier(s, "rz"), sql.Identifier(column))
    rows = _rows_of(conn, s)
    assert [c["op"] for c in rows] == ["insert", "update"] and rows[0]["pk"] == {"id": 2}
    assert rows[1]["after"][column] in (6, "[masked]")


def test_sync_carries_on_past_a_table_it_cannot_regenerate(env: Env) -> None:
    conn = env.conn
    s = _fresh(
        conn,
        "CREATE TABLE {s}.a1 (id int PRIMARY KEY, v int); CREATE TABLE {s}.b1 (code text NOT NULL, v int)",
    )
    ddl.track(conn, f"{s}.a1")
    ddl.track(conn, f"{s}.b1", keys=["code"])
    conn.execute(f"ALTER TABLE {s}.b1 DROP COLUMN code")
    conn.execute(f"ALTER TABLE {s}.a1 ADD COLUMN w int")
    actions = {a.table_name: a for a in ddl.sync(conn) if a.table_schema == s}
    assert actions["a1"].action in ("regenerated", "unchanged")
    assert actions["b1"].action != "failed"
    conn.execute(f"INSERT INTO {s}.b1 VALUES (1)")
    conn.execute(f"UPDATE {s}.a1 SET w = 1")
    statuses = {t.table_name: t.status for t in ddl.tracked_tables(conn) if t.table_schema == s}
    assert statuses["a1"] == "installed" and statuses["b1"] == "outdated"


def test_a_migration_and_a_concurrent_track_never_leave_code_that_fails_writes(env: Env) -> None:
    conn = env.conn
    s = _fresh(conn, "CREATE TABLE {s}.lt (id int PRIMARY KEY, v int)")
    ddl.track(conn, f"{s}.lt")
    with psycopg.connect(conn.info.dsn) as holder:  # a track() still in its transaction
        holder.execute(f"SELECT * FROM threadline.track('{s}.lt')")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            conn.execute("SET lock_timeout = '300ms'")
            try:
                conn.execute(f"ALTER TABLE {s}.lt RENAME COLUMN v TO v2")
            finally:
                conn.execute("RESET lock_timeout")
        holder.commit()
    conn.execute(f"INSERT INTO {s}.lt VALUES (1, 1)")
    conn.execute(f"UPDATE {s}.lt SET v = 2")  # the rename was refused whole: v is still v
    conn.execute(f"ALTER TABLE {s}.lt RENAME COLUMN v TO v2")
    conn.execute(f"UPDATE {s}.lt SET v2 = 3")
    assert [c["op"] for c in _rows_of(conn, s)] == ["insert", "update", "update"]


def test_operational_errors_are_not_usage_errors_and_restore_commands_run(env: Env) -> None:
    conn = env.conn
    s = f"ops_{uuid.uuid4().hex[:6]}"
    conn.execute(f'CREATE SCHEMA "user_{s}"')
    conn.execute(f'CREATE TABLE "user_{s}".acct (id int PRIMARY KEY, v int)')
    ddl.track(conn, f'"user_{s}".acct')
    res = subprocess.run(
        [sys.executable, "-m", "threadline.cli", "track", f'"user_{s}".acct'],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "THREADLINE_DSN": conn.info.dsn,
            "PGOPTIONS": "-c default_transaction_read_only=on",
        },
        timeout=60,
    )
    assert res.returncode == 1 and "read-only" in res.stderr  # the database refused: not a usage error
    conn.execute(f'ALTER TABLE "user_{s}".acct DISABLE TRIGGER ALL')
    (entry,) = [t for t in ddl.tracked_tables(conn) if t.table_schema == f"user_{s}"]
    assert entry.status == "disabled"
    command = entry.restore_command()
    assert command is not None and "ENABLE TRIGGER ALL" not in command
    conn.execute(command)  # runs as it is, quoting included
    assert [t.status for t in ddl.tracked_tables(conn) if t.table_schema == f"user_{s}"] == ["installed"]


def test_a_name_taken_by_another_table_after_a_rename_keeps_the_two_histories_apart(env: Env) -> None:
    conn = env.conn
    s = f"apart_{uuid.uuid4().hex[:6]}"
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, note text)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"INSERT INTO {s}.orders VALUES (1, 'OLD-1')")
    conn.execute(f"ALTER TABLE {s}.orders RENAME TO orders_old")
    conn.execute(f"UPDATE {s}.orders_old SET note = 'OLD-2'")
    conn.execute(f"CREATE TABLE {s}.orders (id int PRIMARY KEY, note text)")
    ddl.track(conn, f"{s}.orders")
    conn.execute(f"INSERT INTO {s}.orders VALUES (1, 'NEW-1')")
    conn.execute(f"UPDATE {s}.orders_old SET note = 'OLD-3'")
    old = [c.after["note"] for c in reversed(threadline.history(conn, f"{s}.orders_old", 1))]
    new = [c.after["note"] for c in reversed(threadline.history(conn, f"{s}.orders", 1))]
    assert (old, new) == (["OLD-1", "OLD-2", "OLD-3"], ["NEW-1"])
    page = threadline.timeline(conn, table=f"{s}.orders")
    assert [c.after["note"] for c in page.changes] == ["NEW-1"]


@pytest.mark.parametrize("event_triggers", [True, False], ids=["event_triggers", "drift_safe"])
def test_a_table_rebuilt_under_its_name_keeps_its_masks(conn: Any, event_triggers: bool) -> None:
    conn.execute("CREATE TABLE app.rebuilt (id int PRIMARY KEY, card text, note text, extra text)")
    ddl.track(conn, "app.rebuilt", mask=["card"], exclude=["note"])
    if not event_triggers:
        conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl DISABLE")
        conn.execute("ALTER EVENT TRIGGER threadline_follow_drop DISABLE")
    try:
        # a migration that rebuilds the table: the old one renamed away, a new one, rows copied
        conn.execute("INSERT INTO app.rebuilt VALUES (1, '4111 1111', 'private', 'x')")
        conn.execute("ALTER TABLE app.rebuilt RENAME TO rebuilt_old")
        conn.execute("CREATE TABLE app.rebuilt (LIKE app.rebuilt_old INCLUDING ALL)")
        conn.execute("INSERT INTO app.rebuilt SELECT * FROM app.rebuilt_old")
        conn.execute("DROP TABLE app.rebuilt_old")
    finally:
        if not event_triggers:
            conn.execute("ALTER EVENT TRIGGER threadline_follow_ddl ENABLE ALWAYS")
            conn.execute("ALTER EVENT TRIGGER threadline_follow_drop ENABLE ALWAYS")
    if event_triggers:  # coverage names the new table, which nothing captures yet
        (new,) = [t for t in health.trigger_coverage(conn, schemas=["app"]) if t.table_name == "rebuilt"]
        assert (new.status, new.restore) == ("replaced", "threadline track app.rebuilt")
        assert health.tracking_problems([new])
    result = ddl.track(conn, "app.rebuilt")  # no options: the dropped table's are taken on
    assert (result.mask, result.exclude) == (("card",), ("note",))
    conn.execute("UPDATE app.rebuilt SET card = '4222 2222', note = 'other', extra = 'y'")
    assert "4222" not in repr(changes(conn)) and "other" not in repr(changes(conn))
    # untracked with forget, a later table of the name starts with no options
    ddl.untrack(conn, "app.rebuilt", forget=True)
    conn.execute("DROP TABLE app.rebuilt")
    conn.execute("CREATE TABLE app.rebuilt (id int PRIMARY KEY, card text)")
    assert ddl.track(conn, "app.rebuilt").mask == ()


def test_untrack_keeps_masks_until_forgotten(conn: Any) -> None:
    dsn = conn.info.dsn
    conn.execute("CREATE TABLE app.acct (id int PRIMARY KEY, ssn text, pw text, note text)")
    ddl.track(conn, "app.acct", mask=["ssn"], exclude=["pw"])
    ddl.untrack(conn, "app.acct")
    assert ddl.kept_options(conn, "app.acct") == (["ssn"], ["pw"])
    (cov,) = [t for t in health.trigger_coverage(conn, schemas=["app"]) if t.table_name == "acct"]
    assert cov.status == "untracked"  # not a table that replaced a dropped one
    result = ddl.track(conn, "app.acct")  # no options: its own come back
    assert (result.mask, result.exclude) == (("ssn",), ("pw",))
    conn.execute("INSERT INTO app.acct VALUES (1, '123-45-6789', 'digest', 'n')")
    # untracked and renamed, tracked under its new name: still its own
    ddl.untrack(conn, "app.acct")
    conn.execute("ALTER TABLE app.acct RENAME TO account")
    assert ddl.track(conn, "app.account").mask == ("ssn",)
    conn.execute("UPDATE app.account SET ssn = '987-65-4321', pw = 'digest-2'")
    assert not [v for v in ("123-45", "987-65", "digest") if v in repr(changes(conn))]
    # the command line says what it kept; --forget drops it
    res = _cli("untrack", "app.account", dsn=dsn)
    assert res.returncode == 0 and "kept for when it is tracked again: masks ssn; excludes pw" in res.stdout
    assert "forget => true" in _cli("untrack", "app.account", "--forget", "--print-sql", dsn=dsn).stdout
    res = _cli("untrack", "app.account", "--forget", dsn=dsn)
    assert res.returncode == 0 and "kept for" not in res.stdout, res.stdout
    assert ddl.kept_options(conn, "app.account") == ([], [])
    assert ddl.track(conn, "app.account").mask == ()


def test_a_name_two_dropped_tables_had_goes_to_the_table_tracked_under_it(conn: Any) -> None:
    for first in ("app.dup", "app.dup_v1"):  # one created with the name, then another renamed to it
        conn.execute(f"CREATE TABLE {first} (id int PRIMARY KEY)")
        ddl.track(conn, first)
        conn.execute(f"INSERT INTO {first} VALUES (1)")
        if first != "app.dup":
            conn.execute(f"ALTER TABLE {first} RENAME TO dup")
        conn.execute("DROP TABLE app.dup")
    conn.execute("CREATE TABLE app.dup (id int PRIMARY KEY)")
    ddl.track(conn, "app.dup")  # takes the name's history: both dropped tables had it
    assert len(list(threadline.history(conn, "app.dup", 1))) == 2
