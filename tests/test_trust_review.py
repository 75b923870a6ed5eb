"""Seal, verify, erase and purge together: the cases where they meet (renamed tables, unmasked
updates, values that are not text, settings of the verifying session, purged sealed rows)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import threadline
from threadline.ops.erasure import TOMBSTONE, erase, pseudonym
from threadline.ops.retention import purge
from threadline.ops.seal import seal, verify

from .conftest import age_audit_rows
from .test_cli import run


@pytest.fixture
def people(conn: psycopg.Connection[Any]) -> str:
    conn.execute(
        "CREATE TABLE app.people (id int PRIMARY KEY, email text, name text, score numeric(8,2), nick text)"
    )
    threadline.ddl.track(conn, "app.people")
    return "app.people"


def _images(conn: psycopg.Connection[Any], pk: int) -> list[tuple[str, Any, Any]]:
    return [
        (r[0], r[1], r[2])
        for r in conn.execute(
            "SELECT op, after::text, before::text FROM threadline.changes WHERE pk = %s::jsonb ORDER BY id",
            [f'{{"id": {pk}}}'],
        ).fetchall()
    ]


def test_an_erased_update_still_names_the_columns_it_changed(
    conn: psycopg.Connection[Any], people: str
) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    conn.execute("UPDATE app.people SET email = 'b@example.com' WHERE id = 1")
    assert list(threadline.history(conn, "app.people", 1)[0].changed_fields or ()) == ["email"]
    erase(conn, row=("app.people", 1), reason="request 1")
    update = threadline.history(conn, "app.people", 1)[0]
    assert update.op == "update" and list(update.changed_fields or ()) == ["email"]
    assert (update.after or {})["email"] == TOMBSTONE


def test_an_erased_image_keeps_its_column_order(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, 'annie')")
    erase(conn, row=("app.people", 1), columns={"score": "keep"}, reason="request 1")
    after = conn.execute("SELECT after FROM threadline.changes").fetchone()
    assert after is not None and list(after[0]) == ["id", "email", "name", "score", "nick"]
    assert after[0]["score"] == 1.5 and after[0]["email"] == TOMBSTONE


def test_nulls_stay_null_and_numbers_pseudonymise_by_value(
    conn: psycopg.Connection[Any], people: str
) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    erase(conn, row=("app.people", 1), policy="pseudonymise", key="k", reason="request 1")
    row = conn.execute("SELECT after FROM threadline.changes").fetchone()
    assert row is not None
    image = row[0]
    assert image["nick"] is None  # nothing was recorded, nothing to erase
    label = "app.people.score"
    assert image["score"] == pseudonym(Decimal("1.50"), "k", label=label) == pseudonym(1.5, "k", label=label)
    # a number and a text that reads the same are different values
    assert pseudonym(Decimal("1.50"), "k") != pseudonym("1.50", "k")
    assert pseudonym(1, "k") != pseudonym("1", "k") and pseudonym(True, "k") != pseudonym(1, "k")
    assert pseudonym(None, "k") != pseudonym("null", "k")


def test_erasing_twice_keeps_pseudonyms_linkable(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    erase(conn, row=("app.people", 1), policy="pseudonymise", key="k", reason="request 1")
    conn.execute("UPDATE app.people SET score = 2 WHERE id = 1")
    erase(conn, row=("app.people", 1), policy="pseudonymise", key="k", reason="request 1, again")
    insert, update = threadline.history(conn, "app.people", 1)[::-1]
    assert insert.after and update.before and update.after
    assert insert.after["email"] == update.before["email"] == update.after["email"]
    assert insert.after["email"] == pseudonym("a@example.com", "k", label="app.people.email")


def test_erasing_a_row_of_a_renamed_table_reaches_its_old_name(
    conn: psycopg.Connection[Any], people: str
) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    conn.execute("ALTER TABLE app.people RENAME TO persons")
    conn.execute("UPDATE app.persons SET name = 'Anne' WHERE id = 1")
    seal(conn)
    done = erase(conn, row=("app.persons", 1), reason="request 1")
    assert done.changes == 2
    assert conn.execute(
        "SELECT count(*) FROM threadline.changes WHERE after::text LIKE '%Ann%' OR before::text LIKE '%Ann%'"
    ).fetchone() == (0,)
    assert verify(conn).ok


def test_erasing_an_actor_leaves_the_same_id_of_another_type(
    conn: psycopg.Connection[Any], people: str
) -> None:
    for i, who in enumerate(("user:7", "service:7", "user:7")):
        with threadline.context(actor=who), threadline.transaction(conn):
            conn.execute("INSERT INTO app.people (id) VALUES (%s)", [i])
    seal(conn)
    done = erase(conn, actor="user:7", reason="request 7")
    assert done.transactions == 2
    actors = [
        r[0]
        for r in conn.execute(
            "SELECT actor FROM threadline.transactions WHERE actor IS NOT NULL ORDER BY id"
        ).fetchall()
    ]
    assert actors == [
        {"type": "user", "id": TOMBSTONE},
        {"type": "service", "id": "7"},
        {"type": "user", "id": TOMBSTONE},
    ]
    assert verify(conn).ok


def test_erase_without_seals_writes_no_link(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    done = erase(conn, row=("app.people", 1), reason="request 1")
    assert done.applied and done.sealed == 0
    assert conn.execute("SELECT count(*) FROM threadline.seals").fetchone() == (0,)
    seal(conn)
    assert verify(conn).ok


def test_erase_and_seal_at_once(conn: psycopg.Connection[Any], dsn: str, people: str) -> None:
    for i in range(20):
        conn.execute("INSERT INTO app.people VALUES (%s, 'a@example.com', 'Ann', 1.50, NULL)", [i])
    with psycopg.connect(dsn) as eraser:
        # the erasure holds the chain's lock while it rewrites; a seal run meanwhile waits for it
        eraser.execute("SELECT pg_advisory_xact_lock(hashtext('threadline seal threadline'))")
        done: list[Any] = []
        sealer = threading.Thread(target=lambda: done.append(seal(psycopg.connect(dsn, autocommit=True))))
        sealer.start()
        time.sleep(0.3)
        assert not done
        erase(eraser, row=("app.people", 3), reason="request 3")
        eraser.commit()
    sealer.join(10)
    assert done and done[0].transactions >= 20
    assert verify(conn).ok


def test_verify_does_not_depend_on_session_settings(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("CREATE TABLE app.kinds (id int PRIMARY KEY, f float8, at timestamptz, d interval, b bytea)")
    threadline.ddl.track(conn, "app.kinds")
    conn.execute(
        "INSERT INTO app.kinds VALUES (1, 0.1, '2024-03-01 12:00:00.5+02', '1 day 2 hours', '\\x00ff')"
    )
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    head = seal(conn).head
    for setting in (
        "SET TimeZone = 'Pacific/Chatham'",
        "SET DateStyle = 'SQL, DMY'",
        "SET DateStyle = 'German'",
        "SET extra_float_digits = -15",
        "SET IntervalStyle = 'sql_standard'",
        "SET bytea_output = 'escape'",
        "SET lc_numeric = 'C'",
        "SET standard_conforming_strings = off",
    ):
        conn.execute(setting)
        result = verify(conn, expect_head=head)
        assert result.ok, (setting, result.problems)


def test_a_recorded_purge_is_not_tampering(conn: psycopg.Connection[Any], people: str) -> None:
    for i in range(6):
        conn.execute("INSERT INTO app.people VALUES (%s, 'a@example.com', 'Ann', 1.50, NULL)", [i])
    seal(conn, batch_size=2)
    # the first four transactions are old; the fifth straddles the cut-off (one change old, one new)
    age_audit_rows(conn, "100 days", "SELECT id FROM threadline.transactions ORDER BY id LIMIT 4")
    assert not verify(conn).ok  # that setup was itself an edit: re-seal from scratch
    conn.execute("TRUNCATE threadline.seals")
    head = seal(conn, batch_size=2).head
    result = purge(conn, "90d", batch_size=1)
    assert (result.changes, result.transactions) == (4, 4)
    checked = verify(conn)
    assert checked.ok, checked.problems
    assert checked.purged == 4 and checked.head != head
    assert "4 removed by recorded purges" in checked.render()
    # a deletion that was not a recorded purge is still tampering
    conn.execute(
        "DELETE FROM threadline.transactions WHERE id = (SELECT max(id) FROM threadline.transactions)"
    )
    again = verify(conn)
    assert not again.ok and "was deleted" in (again.first_problem or "")


def test_a_purge_of_part_of_a_sealed_transaction(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("CREATE TABLE app.sessions (id int PRIMARY KEY)")
    threadline.ddl.track(conn, "app.sessions")
    with threadline.transaction(conn):
        conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
        conn.execute("INSERT INTO app.sessions VALUES (1)")
    age_audit_rows(conn, "100 days")
    seal(conn)
    result = purge(conn, "90d", table="app.sessions")
    assert (result.changes, result.transactions) == (1, 0)
    checked = verify(conn)
    assert checked.ok and checked.purged == 1, checked.problems
    # then a tamper with what is left
    conn.execute("UPDATE threadline.changes SET op = 'delete'")
    assert not verify(conn).ok
    # a dry run records nothing
    before = conn.execute("SELECT count(*) FROM threadline.seals").fetchone()
    purge(conn, "90d", dry_run=True)
    assert conn.execute("SELECT count(*) FROM threadline.seals").fetchone() == before


def test_purge_without_seals_records_no_link(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("INSERT INTO app.people VALUES (1, 'a@example.com', 'Ann', 1.50, NULL)")
    age_audit_rows(conn, "100 days")
    result = purge(conn, "90d")
    assert (result.changes, result.transactions) == (1, 1)
    assert conn.execute("SELECT count(*) FROM threadline.seals").fetchone() == (0,)


def test_a_large_transaction_seals(conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY, v text)")
    threadline.ddl.track(conn, "app.big")
    conn.execute("INSERT INTO app.big SELECT g, 'x' FROM generate_series(1, 20000) g")
    assert seal(conn).transactions == 1
    assert verify(conn).ok
    conn.execute('UPDATE threadline.changes SET after = \'{"id": 5, "v": "y"}\' WHERE pk = \'{"id": 5}\'')
    assert not verify(conn).ok


def test_cli_erase_reports_a_bad_subject_or_table(
    conn: psycopg.Connection[Any], dsn: str, people: str
) -> None:
    res = run("erase", "--subject", "nobody", "--reason", "r", "--dsn", dsn)
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr and res.stderr.strip(), res.stderr
    res = run("erase", "--row", "app.nothing", "1", "--reason", "r", "--dsn", dsn)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "nothing" in res.stderr, res.stderr
    res = run(
        "erase",
        "--subject",
        "user:1",
        "--policy",
        "pseudonymise",
        "--reason",
        "r",
        "--dsn",
        dsn,
        env={"THREADLINE_ERASURE_KEY": ""},
    )
    assert res.returncode == 1 and "THREADLINE_ERASURE_KEY" in res.stderr, res.stderr


def test_cli_as_of_reports_an_unknown_table(conn: psycopg.Connection[Any], dsn: str) -> None:
    res = run("as-of", "app.nothing", "--at", "1h", "--dsn", dsn)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nothing" in res.stderr, res.stderr
