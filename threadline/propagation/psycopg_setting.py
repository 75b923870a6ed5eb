"""The ``threadline.context`` setting for psycopg 3: the value a context gives it and the SQL that sets it.

``context_payload`` computes the value (a context's canonical JSON, or what an installed payload
enricher makes of it); ``set_local_command`` and ``SET_CONTEXT_SQL`` set it on the open transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from threadline.core import fields
from threadline.core.context import AuditContext, current
from threadline.core.errors import InvalidContext
from threadline.ddl.names import CONTEXT_SETTING

SET_CONTEXT_SQL = "SELECT set_config('" + CONTEXT_SETTING + "', %s, true)"
"""``set_config`` of the setting, local to the transaction (``%s``: the value): works where
``SET LOCAL`` would have no effect (autocommit statements, pipelines)."""


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def setting_json(ctx: AuditContext) -> str:
    """``ctx``'s canonical JSON, the setting's value: also when it encodes to more than
    ``max_encoded_bytes``, the cap of carriers and headers, which is not the database's. The capture
    trigger applies its own (16 KiB) and records a larger context as invalid: never a failed write."""
    try:
        return ctx.to_json()
    except InvalidContext:  # over the carriers' cap: encoded again, without it
        return fields.dumps(ctx.to_dict())


def payload_for(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], payload: str) -> str:
    """``payload`` as ``conn`` can send it: unchanged over a UTF-8 connection, otherwise with every
    character outside ASCII written as a JSON escape (``\\u00e9``), the same JSON, so that a
    context never fails a transaction in a database of another encoding (``LATIN1``, say) because
    a character has no equivalent there. The server then reads the escapes through its complete
    checks: a character it can hold is kept, any other makes the context invalid, recorded as such."""
    if payload.isascii() or conn.info.encoding == "utf-8":
        return payload
    return _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], payload)


def set_local_command(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], payload: str) -> bytes:
    """``SET LOCAL threadline.context = <payload>``, quoted for ``conn``'s encoding.

    Inside a transaction block this is the cheapest way to set the context: a utility command the
    server neither plans nor executes as a query (``SELECT set_config(...)`` sent as text cost a
    quarter of a small transaction's throughput in measurements). Outside a block (autocommit
    statements, pipelines) it would have no effect: use ``SET_CONTEXT_SQL`` there.
    """
    return (
        b"SET LOCAL "
        + CONTEXT_SETTING.encode()
        + b" = "
        + sql.Literal(payload_for(conn, payload)).as_bytes(conn)
    )


PayloadEnricher = Callable[[AuditContext], str]
"""``enricher(ctx) -> str``: the setting's value for a non-empty ``ctx`` (see
:func:`set_payload_enricher`)."""

# None (the default): a context's setting is its canonical JSON. Read once per payload computed.
_payload_enricher: PayloadEnricher | None = None


def set_payload_enricher(enricher: PayloadEnricher | None) -> PayloadEnricher | None:
    """Make ``enricher`` compute the database setting of every non-empty context from now on
    (``None``: back to :func:`setting_json`); returns the one it replaces.

    The hook of integrations that add transaction-level data the context itself does not carry
    (:mod:`threadline.otel` adds the active span's ids to ``meta``). It is called each time a
    transaction's value is computed, in the thread or task that opens the transaction, never for
    an empty context; it must return valid canonical context JSON and must not raise. Only the
    database setting is affected: Celery headers and the current context are not.
    """
    global _payload_enricher
    previous, _payload_enricher = _payload_enricher, enricher
    return previous


def payload_enricher() -> PayloadEnricher | None:
    """The function :func:`set_payload_enricher` installed, or ``None``."""
    return _payload_enricher


def context_payload(ctx: AuditContext | None = None) -> str:
    """The setting's value for ``ctx`` (default: the current context); ``""`` when empty."""
    ctx = current() if ctx is None else ctx
    if ctx.is_empty:
        return ""
    enrich = _payload_enricher
    return setting_json(ctx) if enrich is None else enrich(ctx)
