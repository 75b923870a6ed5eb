"""What the commands share: the examples each command's ``--help`` ends with (the group's help
shows them all), and the ``--audit-schema`` option."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from threadline.ddl.names import DEFAULT_SCHEMA

F = TypeVar("F", bound=Callable[..., Any])


def audit_schema_option(func: F) -> F:
    """``--audit-schema NAME`` (default ``threadline``, or ``$THREADLINE_AUDIT_SCHEMA``)."""
    return click.option(
        "--audit-schema",
        "audit_schema",
        default=lambda: os.environ.get("THREADLINE_AUDIT_SCHEMA", DEFAULT_SCHEMA),
        show_default="threadline, or $THREADLINE_AUDIT_SCHEMA",
        help="Name of the audit schema.",
    )(func)


DSN_NOTE = "The DSN comes from --dsn, else THREADLINE_DSN, else DATABASE_URL."
TIME_NOTE = "Times are ISO 8601 (no offset means UTC) or relative: 90s, 30m, 2h, 1d, 2w ago."

COMMAND_EXAMPLES: dict[str, tuple[str, ...]] = {
    "install": (
        "threadline install --dsn postgresql://app@localhost/app",
        "threadline install --app-role app_user",
        "threadline install --print-sql > migrations/0001_threadline.sql",
        "threadline install --partition-by week",
    ),
    "track": (
        "threadline track public.orders --mask card_number --exclude search_vector",
        "threadline track line_items --keys order_id,line_no",
        "threadline track public.orders --unmask card_number",
        "threadline track public.orders --print-sql >> migrations/0002_track_orders.sql",
        "threadline track public.orders --baseline",
    ),
    "baseline": (
        "threadline baseline public.orders",
        "threadline baseline orders line_items --batch-size 5000 --actor user:42",
    ),
    "as-of": (
        "threadline as-of public.orders --at 2024-05-06T00:00:00Z > orders-monday.ndjson",
        "threadline as-of orders --at 3d --format csv",
    ),
    "revert": (
        "threadline revert --correlation-id 0b7c6f1e-4d1a-4c3e-9a55-2f0e8d1c7b42 --dry-run",
        "threadline revert --transaction 1234 --actor admin:7",
        "threadline revert --task 5f1e9c2a-7b3d-4e8f-a1c6-9d2b3e4f5a60 --overwrite",
    ),
    "seal": ("threadline seal", "threadline seal --batch-size 5000 --log"),
    "partitions": (
        "threadline partitions --json",
        "threadline partitions --create --ahead 6",
        "threadline partitions --migrate --batch-size 50000",
    ),
    "verify": ("threadline verify --json", "threadline verify --expect-head 9f2c...e41a"),
    "erase": (
        "threadline erase --subject user:42 --policy pseudonymise --reason 'GDPR request 2024-117'",
        "threadline erase --row customers 42 --column country=keep --reason 'GDPR request 2024-117' --dry-run",
    ),
    "untrack": ("threadline untrack orders", "threadline untrack --prune"),
    "sync": ("threadline sync", "threadline sync --check"),
    "timeline": (
        "threadline timeline --correlation-id req-1",
        "threadline timeline --table orders --actor user:42 --since 2h",
        "threadline timeline --table orders --after <cursor printed by the previous page>",
    ),
    "history": (
        "threadline history orders 7",
        "threadline history line_items order_id=7,line_no=2 --as-of 2024-05-01T12:00:00Z",
    ),
    "trace": ("threadline trace req-1", "threadline trace req-1 --max-changes 0"),
    "export": (
        "threadline export --format ndjson --since 1d --output changes.ndjson",
        "threadline export --format ndjson --cursor-file orders.cursor >> orders.ndjson",
    ),
    "actions": ("threadline actions --actor admin:7 --since 7d",),
    "purge": (
        "threadline purge --older-than 90d --dry-run",
        "threadline purge --older-than 90d --batch-size 5000",
        "threadline purge --older-than 30d --table public.sessions",
    ),
    "coverage": (
        "threadline coverage --expect public.orders,public.line_items",
        "threadline coverage --table-schema public --json",
    ),
}

_TIMED = {"timeline", "history", "export", "actions", "purge", "coverage", "as-of"}


def examples(*commands: str) -> str:
    """The ``Examples:`` epilog of ``commands`` (click keeps the ``\\b`` paragraph as written)."""
    lines = [f"  {line}" for name in commands for line in COMMAND_EXAMPLES[name]]
    notes = [DSN_NOTE]
    if _TIMED.intersection(commands):
        notes.append(TIME_NOTE)
    return "\n\b\nExamples:\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


ALL_EXAMPLES = examples(*COMMAND_EXAMPLES)
"""The group's epilog: every command's examples."""
