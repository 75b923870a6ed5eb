"""``threadline partitions`` as a real subprocess: ``--create`` under a writer that holds the audit
tables says so (not that the database is unreachable), and the listing shows the bounds in UTC,
as the periods are cut, whatever the session's time zone (the JSON listing too)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest

from threadline.ops import partitions

from .conftest import store_database
from .test_cli import run


@pytest.fixture
def monthly() -> Iterator[str]:
    """DSN of a fresh database with an audit store partitioned by month and a tracked ``items``."""
    yield from store_database("month", "threadline_parts_cli")


@pytest.fixture
def daily() -> Iterator[str]:
    """DSN of a fresh database with an audit store partitioned by day and a tracked ``items``."""
    yield from store_database("day", "threadline_parts_cli")


def test_create_held_up_by_a_writer_says_so_and_what_to_do(monthly: str) -> None:
    with psycopg.connect(monthly, autocommit=True) as conn:
        this_month = next(
            p for p in partitions.partitions(conn) if p.table == "changes" and not p.is_default
        ).range_from
        assert this_month is not None
        # this month's partitions are missing: its rows go to the DEFAULT partitions until made
        conn.execute(
            f"DROP TABLE threadline.changes_p{this_month:%Y_%m}, threadline.transactions_p{this_month:%Y_%m}"
        )
    with psycopg.connect(monthly) as writer:
        writer.execute("INSERT INTO items VALUES (1, 'a')")  # and stays open, holding the tables
        res = run("partitions", "--create", "--lock-timeout", "0.1", "--dsn", monthly)
        writer.rollback()
    assert res.returncode == 1, res
    assert res.stderr.startswith("Error: the audit tables stayed busy: 5 attempts could not take their locks")
    assert "within 0.1 s each" in res.stderr and "no partition was made" in res.stderr
    assert "Hint: the application's writers (or a long transaction) hold them" in res.stderr
    assert "--lock-timeout" in res.stderr
    assert "check the DSN" not in res.stderr and "Traceback" not in res.stderr
    made = run("partitions", "--create", "--dsn", monthly)  # once the writer is gone
    assert made.returncode == 0 and made.stdout.startswith("created 2 partition(s)"), made


def test_the_listing_shows_bounds_in_utc_whatever_the_time_zone(daily: str) -> None:
    res = run("partitions", "--dsn", daily, env={"PGTZ": "America/Adak"})
    assert res.returncode == 0, res
    lines = res.stdout.splitlines()
    today = datetime.now(timezone.utc).date()
    spans = {}
    for line in lines[1:]:
        found = re.match(r"(\w+) +(\w+) +(\S+) \.\. (\S+) ", line)
        if found:
            spans[found.group(2)] = (found.group(3), found.group(4))
    # each partition is named after its UTC day, and runs from that midnight to the next
    assert spans, res.stdout
    for name, (lo, hi) in spans.items():
        day = datetime.strptime(name.rsplit("_p", 1)[1], "%Y_%m_%d").date()
        assert (lo, hi) == (f"{day}", f"{day.fromordinal(day.toordinal() + 1)}"), (name, lo, hi)
    assert f"changes_p{today:%Y_%m_%d}" in spans and f"transactions_p{today:%Y_%m_%d}" in spans
    assert lines[0] == "partitioned by day, 3 period(s) kept ready ahead (bounds in UTC)"
    as_json = run("partitions", "--json", "--dsn", daily, env={"PGTZ": "America/Adak"})
    assert as_json.returncode == 0, as_json
    listed = json.loads(as_json.stdout)["partitions"]
    bounds = {p["name"]: (p["from"], p["to"]) for p in listed if p["from"] is not None}
    assert bounds.keys() == spans.keys()
    for name, (lo, hi) in spans.items():
        assert bounds[name] == (f"{lo}T00:00:00+00:00", f"{hi}T00:00:00+00:00"), (name, bounds[name])
