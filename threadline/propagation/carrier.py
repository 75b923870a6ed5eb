"""The audit context on the wire: one header value for Celery and for any other transport.

A carrier holds the context under the key ``threadline`` as the canonical JSON text of its dict
(version field ``v``; see :mod:`threadline.core.codec`). Only the fields that describe *who* and
*which story* travel: ``actor``, ``correlation_id``, ``request_id``, ``causation_id`` and
``meta``. ``origin`` and ``job`` describe where the work runs, and ``incoming_error`` why a
receiver refused what it got, so only the receiving side sets them: a header carrying one is refused.

With a signing key the dict also holds ``sig``: an HMAC-SHA256 over the canonical JSON text of
the rest. A receiver configured with keys accepts only a context signed by one of them; it
checks the signature over exactly the bytes it then decodes.

Celery messages carry that text in a header, and so do other queues through :func:`inject` and
:func:`extract` (RQ, Dramatiq, Kafka record headers, an outbox table). A receiver also accepts
the dict itself (a header written by hand, or by an earlier release).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from threadline.core import codec
from threadline.core.context import AuditContext, current
from threadline.propagation.carrier_decoding import decode_wire
from threadline.propagation.carrier_encoding import encode_wire, safe_id, seal, sender_id, wire_dict
from threadline.propagation.carrier_format import (
    BINDING_FIELD,
    DEFAULT_MAX_BYTES,
    DEFAULT_SIGNATURE_TTL,
    ERROR_FIELD,
    EXPIRY_FIELD,
    HEADER,
    SIGNATURE_FIELD,
    binding,
    check_signing_keys,
)

__all__ = [
    "BINDING_FIELD",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SIGNATURE_TTL",
    "ERROR_FIELD",
    "EXPIRY_FIELD",
    "HEADER",
    "SIGNATURE_FIELD",
    "binding",
    "check_signing_keys",
    "decode_wire",
    "encode_wire",
    "extract",
    "inject",
    "safe_id",
    "seal",
    "sender_id",
    "wire_dict",
]


def inject(
    carrier: MutableMapping[str, str],
    ctx: AuditContext | None = None,
    *,
    signing_key: str | bytes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    message_id: str | None = None,
    ttl: int = DEFAULT_SIGNATURE_TTL,
) -> MutableMapping[str, str]:
    """Put ``ctx`` (default: the current context) into ``carrier`` under ``"threadline"``.

    The value is compact JSON text (encode it for byte-valued headers such as Kafka's). Its
    ``causation_id`` is the sender: the current job's id, else the request id. Nothing is written
    when the context is empty. With ``signing_key`` the value carries an
    HMAC-SHA256 signature that :func:`extract` checks; with ``message_id`` too, the signature is
    bound to that message and expires after ``ttl`` seconds (pass the same id to
    :func:`extract`), so the header cannot be copied onto another message. Raises
    :class:`InvalidContext` when the encoding is larger than ``max_bytes``. Returns ``carrier``.
    """
    ctx = current() if ctx is None else ctx
    if ctx.is_empty:
        return carrier
    key = None if signing_key is None else codec.signing_key(signing_key)
    body = wire_dict(ctx)
    cause = sender_id(ctx)
    if cause is not None:
        body["causation_id"] = cause
    carrier[HEADER] = encode_wire(body, signing_key=key, max_bytes=max_bytes, message_id=message_id, ttl=ttl)
    return carrier


def extract(
    carrier: Mapping[str, Any],
    *,
    signing_keys: Iterable[str | bytes] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    message_id: str | None = None,
) -> AuditContext | None:
    """The context a producer put into ``carrier`` with :func:`inject`; ``None`` when absent.

    Only the carried fields are set (actor, correlation, request and causation ids, meta): layer
    the consumer's own on top, e.g. ``threadline.context(origin="rq", job={...})`` inside
    ``threadline.use_context(ctx)``. Raises :class:`InvalidContext` for a malformed value and,
    when ``signing_keys`` are given, :class:`UntrustedContext` for an unsigned or forged one, one
    bound to another message than ``message_id``, or an expired one (see :func:`decode_wire`).
    """
    raw = carrier.get(HEADER)
    if raw is None:
        return None
    return AuditContext(
        **decode_wire(raw, keys=check_signing_keys(signing_keys), max_bytes=max_bytes, message_id=message_id)
    )
