"""Argument checks shared by the readers, export, actions and the command line: times, windows,
page sizes, operations, actors and text filters, each refused with a :class:`~threadline.core.errors.QueryError`
subclass that says what was wrong."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from psycopg import sql

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.errors import (
    InvalidActor,
    InvalidContext,
    InvalidFilter,
    SchemaError,
)
from threadline.core.records import OPS, iso, utc
from threadline.ddl.names import check_schema_name

MAX_LIMIT = 10_000
"""Largest page a :func:`timeline` call returns."""

ActorLike = ActorRef | str | Mapping[str, Any]
"""An actor filter: an :class:`ActorRef`, ``"type:id"`` text or an actor dict."""

# ---------------------------------------------------------------------------------------------
# Argument validation (shared with export, actions and the CLI)


def check_time(name: str, value: datetime | None) -> datetime | None:
    """A timezone-aware datetime converted to UTC; naive datetimes are refused."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidFilter(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise InvalidFilter(
            f"{name} is a naive datetime; give a timezone-aware one (e.g. datetime.now(timezone.utc))"
        )
    try:
        return utc(value)
    except OverflowError:
        raise InvalidFilter(f"{name} ({value.isoformat()}) is out of range once taken to UTC") from None


def check_window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Validate a ``[since, until)`` window."""
    since, until = check_time("since", since), check_time("until", until)
    if since is not None and until is not None and since > until:
        raise InvalidFilter(f"since ({iso(since)}) is after until ({iso(until)})")
    return since, until


LIMIT_CEILING = 2**62
"""The largest limit any reader takes (a bigint with room for the one more row a page asks for)."""


def check_limit(limit: int | None, *, maximum: int | None = MAX_LIMIT, allow_none: bool = True) -> int | None:
    """A positive integer limit (at most ``maximum``), or ``None`` for no limit when allowed."""
    if limit is None:
        if allow_none:
            return None
        raise InvalidFilter("limit is required")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidFilter(f"limit must be a positive integer, got {limit!r}")
    if maximum is not None and limit > maximum:
        raise InvalidFilter(f"limit {limit} is larger than {maximum}; page with the cursor instead")
    if limit > LIMIT_CEILING:
        raise InvalidFilter(f"limit {limit} is larger than {LIMIT_CEILING}; give None for no limit")
    return limit


def check_op(op: str | None) -> str | None:
    """One of ``insert``, ``update``, ``delete``, ``truncate``."""
    if op is None:
        return None
    if op not in OPS:
        raise InvalidFilter(f"op {op!r} is not one of {', '.join(OPS)}")
    return op


def check_actor(actor: ActorLike | None) -> ActorRef | None:
    """An actor filter as an :class:`ActorRef` (``"user:42"`` text is parsed)."""
    try:
        return fields.check_actor(actor)
    except InvalidActor as exc:
        raise InvalidFilter(f"actor: {exc.problem}") from exc


def check_text_filter(name: str, value: str | None) -> str | None:
    """A non-empty id filter (correlation id, request id...)."""
    if value is None:
        return None
    try:
        return fields.check_text(name, value)
    except InvalidContext as exc:
        raise InvalidFilter(f"{name} {exc.problem}") from exc


def audit_identifier(audit_schema: str) -> sql.Identifier:
    """The audit schema as an SQL identifier, or :class:`~threadline.core.errors.InvalidFilter` for a bad name."""
    try:
        return sql.Identifier(check_schema_name(audit_schema))
    except SchemaError as exc:
        raise InvalidFilter(str(exc)) from exc
