"""The seal chain beyond edits of sealed rows, on the real database: salted digests (format 2)
keep erased values from being recovered from the seals; every transaction still running in the
database holds sealing back; a change of no transaction is caught; erase and purge report the
head they leave; purge links are checked against their cut-off; seal says what holds it back."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import psycopg
import pytest

import threadline
from threadline.ops.erasure import erase
from threadline.ops.retention import purge
from threadline.ops.seal import seal, verify
from threadline.ops.seal_chain import DIGEST_SIZE

from .backends import ADMIN_DSN
from .conftest import age_audit_rows, store_database
from .test_cli import run
from .test_seal import _write


@pytest.fixture
def people(conn: psycopg.Connection[Any]) -> str:
    conn.execute("CREATE TABLE app.people (id int PRIMARY KEY, email text, name text, score numeric(8,2))")
    threadline.ddl.track(conn, "app.people")
    return "app.people"


LEGACY_SEAL = """
INSERT INTO threadline.seals (kind, format, last_xid, last_id, transaction_ids, digests, changes, prev_hash, hash)
SELECT 'seal', 1, n.top_xid, n.top_id, n.ids, n.ds, 0, NULL,
       threadline.seal_hash('seal', NULL, n.top_xid, n.top_id, n.ids, n.ds, NULL)
  FROM (SELECT array_agg(t.id ORDER BY t.xid, t.id) AS ids,
               string_agg(threadline.transaction_digest(t), ''::bytea ORDER BY t.xid, t.id) AS ds,
               max(t.xid) AS top_xid, (array_agg(t.id ORDER BY t.xid DESC, t.id DESC))[1] AS top_id
          FROM threadline.transactions t) AS n
"""
"""The first seal of a chain as seals were made before salts (format 1, unsalted digests)."""


def _sealed_digest(conn: psycopg.Connection[Any], tx: int) -> bytes:
    """The digest the first seal covering ``tx`` recorded for it."""
    row = conn.execute(
        "SELECT substring(s.digests FROM (array_position(s.transaction_ids, %(tx)s::bigint) - 1) * %(n)s + 1"
        " FOR %(n)s) FROM threadline.seals s WHERE s.kind = 'seal' AND %(tx)s = ANY (s.transaction_ids)",
        {"tx": tx, "n": DIGEST_SIZE},
    ).fetchone()
    assert row is not None
    return bytes(row[0])


def _actor_tx(conn: psycopg.Connection[Any], actor_id: str) -> int:
    row = conn.execute(
        "SELECT min(id) FROM threadline.transactions WHERE actor ->> 'id' = %s", [actor_id]
    ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def test_an_erased_value_cannot_be_tested_against_the_seal(
    conn: psycopg.Connection[Any], people: str
) -> None:
    _write(conn, 9)
    seal(conn, batch_size=4)
    tx = _actor_tx(conn, "1")
    # the digest of the transaction as it was: what a reader could compute for a guessed actor id
    row = conn.execute(
        "SELECT threadline.transaction_digest(t) FROM threadline.transactions t WHERE t.id = %s", [tx]
    ).fetchone()
    assert row is not None
    original = bytes(row[0])
    stored = _sealed_digest(conn, tx)
    assert stored != original, "the seal stores the unsalted digest: guesses can be tested against it"
    erase(conn, actor="user:1", policy="pseudonymise", key="k", reason="request 9")
    # no salt left, not even for the owner, turns the original content into the stored digest
    assert conn.execute(
        "SELECT count(*) FROM threadline.seal_salts s WHERE sha256(s.salt || %s) = %s", [original, stored]
    ).fetchone() == (0,)
    # guessing the erased id through transaction_digest() finds nothing
    recovered = conn.execute(
        "SELECT g FROM generate_series(0, 50) g, threadline.transactions t WHERE t.id = %s"
        " AND threadline.transaction_digest(ROW(t.id, t.xid, t.occurred_at,"
        "     jsonb_build_object('type', 'user', 'id', g::text), t.correlation_id, t.request_id, t.causation_id,"
        "     t.origin, t.job, t.action_id, t.meta, t.context_error)::threadline.transactions) = %s",
        [tx, stored],
    ).fetchall()
    assert recovered == []
    result = verify(conn)
    assert result.ok and result.erased >= 1, result.problems


def test_a_missing_salt_is_tampering(conn: psycopg.Connection[Any], people: str) -> None:
    _write(conn, 6)
    seal(conn, batch_size=4)
    tx = _actor_tx(conn, "2")
    conn.execute("DELETE FROM threadline.seal_salts WHERE transaction_id = %s", [tx])
    result = verify(conn)
    assert not result.ok and result.problem_transaction == tx
    assert "lost its salt" in (result.first_problem or "")


def test_format_1_seals_keep_verifying_and_erasing_under_them_warns(
    conn: psycopg.Connection[Any], people: str, caplog: pytest.LogCaptureFixture
) -> None:
    _write(conn, 6)
    conn.execute(LEGACY_SEAL)
    _write(conn, 3, start=7)
    assert seal(conn).transactions == 3
    assert conn.execute("SELECT array_agg(format ORDER BY id) FROM threadline.seals").fetchone() == ([1, 2],)
    assert verify(conn).ok
    with caplog.at_level(logging.WARNING, logger="threadline.seal"):
        done = erase(conn, actor="user:1", policy="erase", reason="request 10")
    # user:1 wrote transactions 1, 4 (format 1) and 7 (format 2)
    assert done.sealed == 3 and done.exposed == 2
    assert "sealed before seals were salted" in caplog.text
    result = verify(conn)
    assert result.ok and result.erased == 3, result.problems


def test_a_transaction_that_took_its_xid_before_writing_holds_sealing_back(
    conn: psycopg.Connection[Any], dsn: str, people: str
) -> None:
    _write(conn, 2)
    with psycopg.connect(dsn) as early:
        early.execute("SELECT pg_current_xact_id()")  # an xid, no lock in this database yet
        _write(conn, 2, start=3)
        assert seal(conn).transactions == 2  # up to the early one, whatever commits after it
        early.execute("INSERT INTO app.people VALUES (100, 'late@example.com', 'L', 0)")
        early.commit()
    assert seal(conn).transactions == 3
    result = verify(conn)
    assert result.ok and result.transactions == 5, result.problems


def test_a_transaction_of_another_database_does_not_hold_sealing_back(
    conn: psycopg.Connection[Any], people: str
) -> None:
    _write(conn, 2)
    with psycopg.connect(ADMIN_DSN) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")
        _write(conn, 2, start=3)
        assert seal(conn).transactions == 4
        elsewhere.rollback()


@pytest.mark.parametrize("layout", ["month", None], ids=["partitioned", "plain"])
def test_a_change_of_a_transaction_that_does_not_exist_is_caught(layout: str | None) -> None:
    for dsn in store_database(layout, prefix="threadline_orphan"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(3):
                with threadline.transaction(conn):
                    conn.execute("INSERT INTO items VALUES (%s, 'v')", [i])
            seal(conn)
            assert verify(conn).ok
            # a change inserted into the sealed period, naming a transaction that never was
            start = ", occurred_at" if layout else ""  # the partition key (and only there)
            conn.execute(
                "INSERT INTO threadline.changes (transaction_id, table_schema, table_name, op, pk, after,"
                f" captured_at{start}) SELECT 424242, table_schema, table_name, 'update', pk, after,"
                f" captured_at - interval '1 ms'{start} FROM threadline.changes ORDER BY id LIMIT 1"
            )
            result = verify(conn)
            assert not result.ok and result.problem_transaction == 424242
            assert "424242, which does not exist" in (result.first_problem or "")


def test_erase_and_purge_report_the_new_head(conn: psycopg.Connection[Any], dsn: str, people: str) -> None:
    _write(conn, 6)
    age_audit_rows(conn, "100 days", "SELECT id FROM threadline.transactions WHERE actor ->> 'id' = '2'")
    age_audit_rows(conn, "50 days", "SELECT id FROM threadline.transactions WHERE actor ->> 'id' = '0'")
    sealed = seal(conn)
    done = erase(conn, actor="user:1", policy="erase", reason="request 11")
    assert done.head is not None and done.head != sealed.head
    assert verify(conn, expect_head=done.head).ok
    assert not verify(conn, expect_head=sealed.head).ok  # the head kept before the erasure is not the end
    purged = purge(conn, "80d")
    assert purged.transactions == 2 and purged.head is not None and purged.head != done.head
    assert verify(conn, expect_head=purged.head).ok
    res = run("erase", "--subject", "user:0", "--reason", "request 12", "--dsn", dsn)
    assert res.returncode == 0, res.stderr
    erased_head = res.stdout.split("head ")[1].strip()
    assert erased_head != purged.head and verify(conn, expect_head=erased_head).ok
    res = run("purge", "--older-than", "30d", "--dsn", dsn)
    assert res.returncode == 0 and "2 transactions" in res.stdout, res.stdout + res.stderr
    head = res.stdout.split("head ")[1].strip()
    assert head != erased_head and verify(conn, expect_head=head).ok


FORGED_PURGE = """
WITH prev AS (SELECT * FROM threadline.seals ORDER BY id DESC LIMIT 1)
INSERT INTO threadline.seals (kind, format, last_xid, last_id, transaction_ids, digests, changes, prev_hash, hash,
                              detail)
SELECT 'purge', %(format)s, prev.last_xid, prev.last_id, ARRAY[%(tx)s]::bigint[], decode(repeat('00', 32), 'hex'),
       0, prev.hash,
       CASE WHEN %(format)s = 1
            THEN threadline.seal_hash('purge', prev.hash, prev.last_xid, prev.last_id, ARRAY[%(tx)s]::bigint[],
                                      decode(repeat('00', 32), 'hex'), NULL)
            ELSE threadline.seal_hash('purge', 2, prev.hash, prev.last_xid, prev.last_id, ARRAY[%(tx)s]::bigint[],
                                      decode(repeat('00', 32), 'hex'), NULL, %(detail)s, NULL) END,
       %(detail)s
  FROM prev
"""
"""A purge link made by hand, as the schema's owner could, excusing the deletion of ``tx``."""


@pytest.mark.parametrize(
    "format_, cutoff, says",
    [
        (1, None, "is of format 1 after links of format 2"),
        (2, None, "does not say what it purged"),
        (2, "2001-01-01T00:00:00+00:00", "not before its cut-off"),
    ],
    ids=["old-format", "no-cut-off", "cut-off-too-early"],
)
def test_a_hand_made_purge_link_is_caught(
    conn: psycopg.Connection[Any], people: str, format_: int, cutoff: str | None, says: str
) -> None:
    _write(conn, 6)
    seal(conn)
    tx = _actor_tx(conn, "1")
    conn.execute("DELETE FROM threadline.changes WHERE transaction_id = %s", [tx])
    conn.execute("DELETE FROM threadline.transactions WHERE id = %s", [tx])
    detail = None if cutoff is None else json.dumps({"cutoff": cutoff, "tables": None})
    conn.execute(FORGED_PURGE, {"format": format_, "tx": tx, "detail": detail})
    result = verify(conn)
    assert not result.ok and says in " ".join(result.problems), result.problems


def test_verify_lists_what_was_recorded_after_the_head_given(
    conn: psycopg.Connection[Any], people: str
) -> None:
    _write(conn, 6)
    age_audit_rows(conn, "100 days", "SELECT id FROM threadline.transactions WHERE actor ->> 'id' = '2'")
    kept = seal(conn).head
    assert kept is not None
    erase(conn, actor="user:1", policy="erase", reason="request 12")
    purge(conn, "30d", table="app.people")
    _write(conn, 2, start=7)
    seal(conn)
    result = verify(conn, expect_head=kept)
    assert not result.ok  # the chain must still end with the head given
    erasure, purged, seals = result.after_head
    assert re.match(r"link \d+: erasure at .*, 2 sealed transaction\(s\), recorded as action \d+$", erasure)
    # the purge's two links (its changes, then its emptied transactions)
    assert re.match(r"links \d+-\d+: purge at .*, 2 sealed transaction\(s\), cut-off ", purged), purged
    # (with the names the table had: a table of this name dropped by an earlier test may add its own)
    assert re.search(r"tables app\.people(, |$)", purged), purged
    assert seals == "1 seal(s) of 3 transaction(s)"  # the erasure's own transaction, and two written
    assert f"recorded after the head kept outside the database:\n  {erasure}\n" in result.render()
    assert verify(conn, expect_head=result.head).after_head == []


def test_seal_says_which_baseline_holds_it_back(conn: psycopg.Connection[Any], dsn: str, people: str) -> None:
    conn.execute("CREATE TABLE app.big (id int PRIMARY KEY)")
    conn.execute("INSERT INTO app.big SELECT generate_series(1, 30)")
    threadline.ddl.track(conn, "app.big")
    conn.execute("SELECT * FROM threadline.baseline_batch('app.big', 10)")  # started, not finished
    _write(conn, 2)
    result = seal(conn)
    assert result.transactions == 0 and result.held_back is not None
    assert re.match(
        r"sealing is held back at transaction \d+ by the baseline of app\.big being taken since \S+"
        r" \(10 rows so far; 2 later transaction\(s\) wait\): finish it with threadline baseline app\.big$",
        result.held_back,
    ), result.held_back
    res = run("seal", "--dsn", dsn)
    assert res.returncode == 0 and "held back at transaction" in res.stdout, res.stdout + res.stderr
    threadline.take_baseline(conn, "app.big", batch_size=10)
    done = seal(conn)
    assert done.transactions == 3 and done.held_back is None
