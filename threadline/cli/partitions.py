"""``threadline partitions``: list the audit store's partitions, create them ahead, change how far
ahead, and move a plain store to the partitioned layout online."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click
import psycopg

from threadline.cli.connect import connect, dsn_option, fail, when_option_value
from threadline.cli.help import audit_schema_option, examples
from threadline.cli.output import echo
from threadline.core.busy import TABLES_BUSY
from threadline.core.errors import ConfigurationError
from threadline.ddl.schema import DEFAULT_PARTITION_BY, PARTITION_PERIODS
from threadline.ops import partitions as store
from threadline.ops.partition_migration import migrate_to_partitioned

__all__ = ["partitions"]

ATTEMPTS = 5
"""Attempts of ``--create`` when writers hold the audit tables."""


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@click.command(epilog=examples("partitions"))
@click.option("--create", is_flag=True, help="Create the partitions of this period and the periods ahead.")
@click.option(
    "--ahead",
    type=click.IntRange(min=1, max=store.MAX_AHEAD),
    help="Periods after the current one to keep ready (stored: later runs and the job use it).",
)
@click.option(
    "--since",
    metavar="WHEN",
    callback=when_option_value,
    help="With --create: also every period from the one holding WHEN (ISO time or 90d).",
)
@click.option("--migrate", is_flag=True, help="Move a plain (unpartitioned) store to partitions, online.")
@click.option(
    "--partition-by",
    type=click.Choice(PARTITION_PERIODS),
    default=DEFAULT_PARTITION_BY,
    show_default=True,
    help="With --migrate: the period.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="With --migrate: rows copied per transaction.",
)
@click.option("--keep-old", is_flag=True, help="With --migrate: keep the old tables (as *_plain).")
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="With --create (or --ahead): wait at most this long for each lock of the audit tables (the application's "
    f"writes queue behind it), and try again up to {ATTEMPTS} times.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the partitions as JSON.")
@dsn_option
@audit_schema_option
def partitions(
    create: bool,
    ahead: int | None,
    since: datetime | None,
    migrate: bool,
    partition_by: str,
    batch_size: int,
    keep_old: bool,
    lock_timeout: float,
    as_json: bool,
    dsn: str | None,
    audit_schema: str,
) -> None:
    """List the audit store's partitions (period, rows, size); create them ahead; partition a
    plain store online.

    Run `threadline partitions --create` periodically (daily is plenty): it keeps the current
    period and the periods ahead ready, so writes never land in the DEFAULT partition.
    """
    if since is not None and not create:
        raise click.UsageError("--since goes with --create")
    if create and migrate:
        raise click.UsageError("--create and --migrate are separate runs: --migrate creates what it needs")
    with connect(dsn) as conn:
        conn.autocommit = True
        try:
            if migrate:
                done = migrate_to_partitioned(
                    conn,
                    partition_by=partition_by,
                    ahead=ahead or 3,
                    batch_size=batch_size,
                    audit_schema=audit_schema,
                    keep_old=keep_old,
                    progress=_progress(),
                )
                echo(
                    f"partitioned: {done.transactions} transactions and {done.changes} changes copied in "
                    f"{done.seconds:.1f} s (tables locked {done.switch_seconds * 1000:.0f} ms);"
                    f" {done.partitions} partitions"
                    + ("; old tables kept as *_plain" if done.kept_old else "")
                )
            if ahead is not None and not migrate:
                store.set_partitions_ahead(conn, ahead, audit_schema)
            if create or (ahead is not None and not migrate):
                made = _create(conn, since, audit_schema, lock_timeout)
                echo(f"created {made} partition(s)")
            settings = store.partition_settings(conn, audit_schema)
            listed = store.partitions(conn, audit_schema)
        except ConfigurationError as exc:
            fail(str(exc))
    if as_json:
        echo(
            json.dumps(
                {
                    "period": settings and settings.period,
                    "ahead": settings and settings.ahead,
                    "partitions": [p.to_dict() for p in listed],
                }
            )
        )
        return
    if settings is None:
        echo("the audit store is not partitioned (`threadline partitions --migrate` partitions it)")
        return
    if migrate or create or ahead is not None:
        return
    echo(f"partitioned by {settings.period}, {settings.ahead} period(s) kept ready ahead (bounds in UTC)")
    for p in listed:
        span = "DEFAULT" if p.is_default else f"{_utc(p.range_from)} .. {_utc(p.range_to)}"
        echo(f"{p.table:<13} {p.name:<28} {span:<24} {p.rows:>12,} rows {_size(p.bytes):>10}")
    stray = [p for p in listed if p.is_default and p.rows]
    if stray:
        echo(
            f"the DEFAULT partition holds {sum(p.rows for p in stray)} row(s): run `threadline partitions --create"
            " --since <their oldest time>` to give them their periods",
            err=True,
        )


def _create(
    conn: psycopg.Connection[Any], since: datetime | None, audit_schema: str, lock_timeout: float
) -> int:
    """``create_partitions``, its failure to get the tables' locks told as what it is."""
    try:
        return store.create_partitions(
            conn, since=since, audit_schema=audit_schema, lock_timeout=lock_timeout, attempts=ATTEMPTS
        )
    except TABLES_BUSY as exc:
        fail(
            f"the audit tables stayed busy: {ATTEMPTS} attempts could not take their locks within"
            f" {lock_timeout:g} s each ({str(exc).strip().splitlines()[0]}); no partition was made",
            "the application's writers (or a long transaction) hold them: run it again, at a quieter"
            " time, or give it longer with --lock-timeout (the writes queue behind it that long)",
        )
        raise AssertionError("unreachable") from exc


def _utc(at: datetime | None) -> str:
    """A partition bound as the periods are cut: in UTC, with the time when it is not midnight."""
    assert at is not None
    at = at.astimezone(timezone.utc)
    return f"{at:%Y-%m-%d}" if at.time() == datetime.min.time() else f"{at:%Y-%m-%d %H:%M:%S}"


def _progress() -> Callable[[str, int], None]:
    def report(kind: str, rows: int) -> None:
        if sys.stderr.isatty():
            echo(f"\r{kind}: {rows:,} copied", nl=False, err=True)

    return report
