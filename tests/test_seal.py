"""Tamper evidence (seal, verify) and erasure, on the real database: every kind of edit a superuser
could make to a sealed audit row is caught; a recorded erasure is not mistaken for one."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

import threadline
from threadline.core.errors import ConfigurationError, InvalidFilter
from threadline.ops.erasure import TOMBSTONE, erase, pseudonym
from threadline.ops.seal import seal, verify

from .test_cli import run


def _write(conn: psycopg.Connection[Any], n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        with (
            threadline.context(actor=f"user:{i % 3}", correlation_id=f"req-{i}"),
            threadline.transaction(conn),
        ):
            conn.execute("INSERT INTO app.people VALUES (%s, %s, 'Name', 1.50)", [i, f"p{i}@example.com"])
            if i % 2:
                conn.execute("UPDATE app.people SET score = score + 1 WHERE id = %s", [i])


@pytest.fixture
def people(conn: psycopg.Connection[Any]) -> str:
    conn.execute("CREATE TABLE app.people (id int PRIMARY KEY, email text, name text, score numeric(8,2))")
    threadline.ddl.track(conn, "app.people")
    return "app.people"


def _tx(conn: psycopg.Connection[Any], n: int) -> int:
    row = conn.execute(
        "SELECT id FROM threadline.transactions ORDER BY xid, id OFFSET %s LIMIT 1", [n - 1]
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_seal_in_batches_and_verify(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, 25)
    first = seal(conn, batch_size=10)
    assert (first.seals, first.transactions) == (3, 25)
    again = seal(conn, batch_size=10)
    assert (again.seals, again.transactions, again.head) == (0, 0, first.head)
    result = verify(conn, expect_head=first.head)
    assert result.ok and result.transactions == 25 and result.seals == 3 and result.head == first.head
    assert result.render().startswith("ok: 25 sealed transactions in 3 links")
    _write(conn, 5, start=26)
    later = seal(conn, batch_size=10)
    assert later.transactions == 5 and later.head != first.head
    assert verify(conn, expect_head=later.head).ok
    # the old head no longer ends the chain
    assert not verify(conn, expect_head=first.head).ok


@pytest.mark.parametrize(
    "tamper, says",
    [
        (
            'UPDATE threadline.changes SET after = \'{"id": 7, "email": "x"}\' WHERE pk = \'{"id": 7}\' AND op = \'insert\'',
            "no longer matches",
        ),
        (
            'UPDATE threadline.transactions SET actor = \'{"type": "user", "id": "99"}\' WHERE id = {tx}',
            "no longer matches",
        ),
        ("DELETE FROM threadline.changes WHERE transaction_id = {tx} AND op = 'update'", "no longer matches"),
        (
            "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk) VALUES ({tx}, 'app', 'people', 'delete', '{{\"id\": 1}}')",
            # partitioned, the row lands in the inserter's partition, not its transaction's
            "no longer matches|without its start time",
        ),
        ("DELETE FROM threadline.transactions WHERE id = {tx}", "was deleted"),
        (
            "INSERT INTO threadline.transactions (xid, occurred_at) SELECT xid, occurred_at FROM threadline.transactions WHERE id = {tx}",
            "was inserted into the range",
        ),
        (
            "UPDATE threadline.changes SET captured_at = captured_at + interval '1 second' WHERE transaction_id = {tx}",
            "no longer matches",
        ),
    ],
)
def test_every_edit_of_a_sealed_row_is_caught(
    conn: psycopg.Connection[Any], people: str, tamper: str, says: str
) -> None:
    _write(conn, 12)
    seal(conn, batch_size=5)
    tx = _tx(conn, 7)
    conn.execute(tamper.replace("{tx}", str(tx)).replace("{{", "{").replace("}}", "}"))
    result = verify(conn)
    assert not result.ok
    assert result.first_problem is not None and re.search(says, result.first_problem)
    if "inserted into" not in says:
        assert result.problem_transaction == tx


def test_seals_themselves_are_chained(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, 12)
    head = seal(conn, batch_size=4).head
    conn.execute(
        "UPDATE threadline.seals SET changes = changes + 1 WHERE id = (SELECT min(id) + 1 FROM threadline.seals)"
    )
    assert verify(conn).ok  # the count is informative, not part of the hash
    conn.execute(
        "UPDATE threadline.seals SET digests = set_byte(digests, 0, get_byte(digests, 0) # 255)"  # a flipped byte
        " WHERE id = (SELECT min(id) + 1 FROM threadline.seals)"
    )
    assert "was changed" in (verify(conn).first_problem or "")
    conn.execute("TRUNCATE threadline.seals")
    seal(conn, batch_size=4)
    # the position a seal leaves the chain at is part of its hash too
    conn.execute(
        "UPDATE threadline.seals SET last_id = last_id - 1 WHERE id = (SELECT min(id) FROM threadline.seals)"
    )
    assert "was changed" in (verify(conn).first_problem or "")
    conn.execute(
        "UPDATE threadline.seals SET last_id = last_id + 1 WHERE id = (SELECT min(id) FROM threadline.seals)"
    )
    assert verify(conn).ok
    conn.execute("DELETE FROM threadline.seals WHERE id = (SELECT min(id) + 1 FROM threadline.seals)")
    assert "does not follow" in (verify(conn).first_problem or "")
    conn.execute("TRUNCATE threadline.seals")
    seal(conn, batch_size=4)
    conn.execute("DELETE FROM threadline.seals WHERE id = (SELECT max(id) FROM threadline.seals)")
    assert verify(conn).ok  # cut at the end: only the head kept outside can tell
    cut = verify(conn, expect_head=head)
    assert not cut.ok and "not with the head hash kept outside" in (cut.first_problem or "")


def test_a_running_transaction_is_not_sealed_until_it_ends(
    conn: psycopg.Connection[Any], dsn: str, people: str
) -> None:
    _write(conn, 3)
    with psycopg.connect(dsn) as other:
        other.execute("INSERT INTO app.people VALUES (100, 'late@example.com', 'L', 0)")
        _write(conn, 3, start=4)
        first = seal(conn, batch_size=100)
        assert first.transactions == 3  # stops before the running one, whatever commits after it
        other.commit()
    assert verify(conn).ok
    rest = seal(conn, batch_size=100)
    assert rest.transactions == 4
    assert verify(conn).ok


def test_a_baseline_being_taken_holds_sealing_back(conn: psycopg.Connection[Any], people: str) -> None:
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY)")
    conn.execute("INSERT INTO app.big SELECT generate_series(1, 30)")
    threadline.ddl.track(conn, "app.big")
    conn.execute("SELECT * FROM threadline.baseline_batch('app.big', 10)")  # started, not finished
    _write(conn, 3)
    assert seal(conn).transactions == 0
    threadline.take_baseline(conn, "app.big", batch_size=10)
    assert seal(conn).transactions == 4
    assert verify(conn).ok


def test_erasing_an_actor_keeps_the_chain_verifiable(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, 9)
    with threadline.context(actor="user:1", correlation_id="req-a"), threadline.transaction(conn):
        threadline.record_action(conn, "profile.viewed")
    seal(conn, batch_size=4)
    before = conn.execute(
        "SELECT count(*) FROM threadline.transactions WHERE actor ->> 'id' = '1'"
    ).fetchone()
    dry = erase(conn, actor="user:1", policy="pseudonymise", key="k1", reason="request 17", dry_run=True)
    assert before is not None and not dry.applied and dry.transactions == before[0]
    assert (
        conn.execute("SELECT count(*) FROM threadline.transactions WHERE actor ->> 'id' = '1'").fetchone()
        == before
    )
    with threadline.context(actor="admin:1"):
        done = erase(conn, actor="user:1", policy="pseudonymise", key="k1", reason="request 17")
    alias = pseudonym("1", "k1", label="actor:user")
    assert (
        done.applied
        and done.target == f"user:{alias}"
        and done.actions == 1
        and done.sealed == done.transactions
    )
    rows = conn.execute(
        "SELECT actor FROM threadline.transactions WHERE actor ->> 'id' = %s", [alias]
    ).fetchall()
    assert len(rows) == done.transactions and all(r[0] == {"type": "user", "id": alias} for r in rows)
    assert conn.execute(
        "SELECT count(*) FROM threadline.actions WHERE actor ->> 'type' = 'user' AND actor ->> 'id' = '1'"
    ).fetchone() == (0,)
    action = conn.execute(
        "SELECT a.actor, a.reason, a.meta FROM threadline.actions a WHERE a.name = 'threadline.erase'"
    ).fetchone()
    assert action is not None and action[0]["id"] == "1" and action[0]["type"] == "admin"
    assert action[1] == "request 17" and action[2]["target"] == f"user:{alias}"
    result = verify(conn)
    assert result.ok and result.erased == done.sealed, result.problems
    # a tamper after the erasure is still a tamper
    conn.execute("UPDATE threadline.transactions SET correlation_id = 'x' WHERE id = %s", [_tx(conn, 2)])
    assert not verify(conn).ok


def test_erasing_a_row_with_column_policies(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, 6)
    conn.execute("UPDATE app.people SET email = 'new3@example.com' WHERE id = 3")
    seal(conn)
    with pytest.raises(ConfigurationError, match="THREADLINE_ERASURE_KEY"):
        erase(conn, row=("app.people", 3), columns={"email": "pseudonymise"}, reason="r")
    done = erase(
        conn, row=("app.people", 3), columns={"email": "pseudonymise", "score": "keep"}, key="k", reason="r"
    )
    assert done.changes == 3 and done.applied
    images = conn.execute(
        "SELECT op, after::jsonb, before::jsonb FROM threadline.changes WHERE pk = '{\"id\": 3}' ORDER BY id"
    ).fetchall()
    for _op, after, before in images:
        for image in (after, before):
            if image is not None:
                assert (
                    image["id"] == 3
                    and image["name"] == TOMBSTONE
                    and str(image["score"]).startswith(("1.5", "2.5"))
                )
                assert image["email"].startswith("pseudo:")
    # the same value has the same pseudonym in every image
    assert images[0][1]["email"] == images[1][2]["email"] and images[1][1]["email"] == images[2][2]["email"]
    assert conn.execute(
        "SELECT count(*) FROM threadline.changes WHERE after::text LIKE '%p3@example%'"
    ).fetchone() == (0,)
    assert verify(conn).ok
    assert threadline.history(conn, "app.people", 3)[0].after["name"] == TOMBSTONE


def test_erase_refuses_bad_input(conn: psycopg.Connection[Any], people: str) -> None:
    with pytest.raises(InvalidFilter, match="exactly one"):
        erase(conn, reason="r")
    with pytest.raises(InvalidFilter, match="reason is required"):
        erase(conn, actor="user:1", reason=" ")
    with pytest.raises(InvalidFilter, match="policy"):
        erase(conn, actor="user:1", policy="shred", reason="r")


def test_cli_seal_verify_erase(conn: psycopg.Connection[Any], dsn: str, people: str) -> None:
    _write(conn, 4)
    res = run("seal", "--batch-size", "2", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    head = res.stdout.split("head ")[1].strip()
    assert "sealed 4 transaction(s) in 2 seal(s)" in res.stdout
    res = run("verify", "--expect-head", head, "--dsn", dsn)
    assert res.returncode == 0 and res.stdout.startswith("ok: 4 sealed"), res.stdout + res.stderr
    res = run("erase", "--subject", "user:2", "--reason", "ticket 9", "--dry-run", "--dsn", dsn)
    assert res.returncode == 0 and "would rewrite 1 transaction(s)" in res.stdout, res.stdout + res.stderr
    res = run("erase", "--row", "app.people", "2", "--reason", "ticket 9", "--actor", "admin:3", "--dsn", dsn)
    assert res.returncode == 0 and "rewrote" in res.stdout, res.stderr
    assert run("verify", "--dsn", dsn).returncode == 0
    conn.execute("UPDATE threadline.changes SET op = 'delete' WHERE pk = '{\"id\": 1}'")
    res = run("verify", "--json", "--dsn", dsn)
    assert res.returncode == 1 and '"ok": false' in res.stdout
    res = run("erase", "--reason", "x", "--dsn", dsn)
    assert res.returncode == 2 and "exactly one" in res.stderr
