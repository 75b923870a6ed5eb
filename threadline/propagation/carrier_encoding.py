"""Writing a carried context header: the fields a context sends, sealed, signed and bound to its message."""

from __future__ import annotations

import time
from typing import Any

from threadline.core import codec
from threadline.core.actor import FORBIDDEN_TEXT_RE
from threadline.core.context import AuditContext
from threadline.core.errors import InvalidContext
from threadline.core.fields import VERSION, dumps, limits
from threadline.propagation.carrier_format import (
    _CARRIED_TEXT,
    _VERSION_TAIL,
    BINDING_FIELD,
    DEFAULT_SIGNATURE_TTL,
    EXPIRY_FIELD,
    SIGNATURE_FIELD,
    binding,
)


def wire_dict(ctx: AuditContext, *, keep_incoming_error: bool = False) -> dict[str, Any]:
    """The carried part of ``ctx`` as its canonical dict (without signature), as is."""
    out: dict[str, Any] = {"v": VERSION}
    if ctx.actor is not None:
        out["actor"] = ctx.actor.to_dict()
    for name in _CARRIED_TEXT:
        value = getattr(ctx, name)
        if value is not None:
            out[name] = value
    if ctx.meta is not None:
        out["meta"] = dict(ctx.meta)
    if keep_incoming_error and ctx.incoming_error is not None:
        out["incoming_error"] = ctx.incoming_error
    return out


def sender_id(ctx: AuditContext) -> str | None:
    """The id of the unit of work ``ctx`` describes: what a message sent from it is caused by.

    The job's id when it runs in a job, else the request id, else its own cause.
    """
    job_id = safe_id((ctx.job or {}).get("id"))
    return job_id or ctx.request_id or ctx.causation_id


def safe_id(value: object) -> str | None:
    """``value`` when it is usable as an audit id (1-256 characters, no control characters)."""
    if not isinstance(value, str) or not 0 < len(value) <= limits().max_id_length:
        return None
    if value.isascii() and value.isprintable():  # the common case (uuids), without a regex
        return value
    return None if FORBIDDEN_TEXT_RE.search(value) else value


def seal(body: dict[str, Any], *, signing_key: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Check the size of ``body`` and sign it in place when a key is given; returns ``body``.

    Raises :class:`InvalidContext` when its canonical encoding is larger than ``max_bytes``.
    """
    text = dumps(body)
    _check_size(text, max_bytes)
    if signing_key is not None:
        body[SIGNATURE_FIELD] = codec.sign(text, signing_key)
    return body


def encode_wire(
    body: dict[str, Any],
    *,
    signing_key: bytes | None,
    max_bytes: int,
    message_id: str | None = None,
    ttl: int = DEFAULT_SIGNATURE_TTL,
    not_before: float | None = None,
) -> str:
    """The header value for ``body``: its canonical JSON text, with ``sig`` when a key is given.

    A signed header with ``message_id`` is bound to that message (``msg``) and expires after
    ``ttl`` seconds (``exp``; counted from ``not_before`` when that is later than now: a message
    due later), both under the signature, so it cannot be copied onto another message or replayed
    later. The same text as ``dumps(seal(body, ...))``, without encoding
    ``body`` twice; ``body`` is left as it is. Raises :class:`InvalidContext` when the text,
    signature included, is larger than ``max_bytes`` (what :func:`decode_wire` accepts).
    """
    if signing_key is not None and message_id is not None:
        start = time.time() if not_before is None else max(time.time(), not_before)
        body = {**body, BINDING_FIELD: binding(message_id), EXPIRY_FIELD: int(start) + ttl}
    text = dumps(body)
    if signing_key is not None:
        _check_size(text, max_bytes)  # before signing a text that is too large anyway
        signature = codec.sign(text, signing_key)
        if text.endswith(_VERSION_TAIL):  # always, for a carried body: "v" is its last key
            text = f'{text[: -len(_VERSION_TAIL)]},"{SIGNATURE_FIELD}":"{signature}"{_VERSION_TAIL}'
        else:
            text = dumps({**body, SIGNATURE_FIELD: signature})
    _check_size(text, max_bytes)
    return text


def _check_size(text: str, max_bytes: int) -> None:
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidContext(
            "context",
            f"needs {size} bytes in a message header; the limit is {max_bytes}: make meta smaller, "
            "or raise max_header_bytes (RabbitMQ refuses header frames over ~128 KiB)",
        )
