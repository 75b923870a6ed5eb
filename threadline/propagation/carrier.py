"""The audit context on the wire: one header value for Celery and for any other transport.

A carrier holds the context under the key ``threadline`` as its canonical dict (version field
``v``; see :mod:`threadline.codec`). Only the fields that describe *who* and *which story* travel:
``actor``, ``correlation_id``, ``request_id``, ``causation_id`` and ``meta``. ``origin`` and
``job`` describe where the work runs, so the receiving side sets them.

With a signing key the dict also holds ``sig``: an HMAC-SHA256 over the canonical JSON text of
the rest. A receiver configured with keys accepts only a context signed by one of them.

:func:`inject` and :func:`extract` use this codec for queues other than Celery (RQ, Dramatiq,
Kafka record headers, an outbox table): the value is the JSON text of that dict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from threadline import codec
from threadline.actor import ActorRef
from threadline.context import AuditContext, current
from threadline.errors import ConfigurationError, InvalidContext, UntrustedContext

HEADER = "threadline"
"""The key (message header name) the context travels under."""

SIGNATURE_FIELD = "sig"
ERROR_FIELD = "error"
DEFAULT_MAX_BYTES = 8192
"""Default cap of a carried context's encoding: far under RabbitMQ's header-frame limit."""

_LOCAL_FIELDS = ("origin", "job")
_CARRIED = frozenset({"v", *codec.ALL_FIELDS}) - set(_LOCAL_FIELDS)
_CARRIED_TEXT = ("correlation_id", "request_id", "causation_id")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_signing_keys(keys: Iterable[str | bytes] | None) -> tuple[bytes, ...]:
    """Validate a list of signing keys (the first signs, all verify) and return them as bytes."""
    if keys is None:
        return ()
    if isinstance(keys, (str, bytes)):
        raise ConfigurationError("signing_keys must be a list of keys, e.g. [new_key, old_key], not one key")
    out = tuple(codec.signing_key(key) for key in keys)
    if not out:
        raise ConfigurationError("signing_keys is empty: pass at least one key, or None to disable signing")
    return out


def wire_dict(ctx: AuditContext, *, keep_incoming_error: bool = False) -> dict[str, Any]:
    """The carried part of ``ctx`` as its canonical dict (without signature), as is."""
    out: dict[str, Any] = {"v": codec.VERSION}
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
    if not isinstance(value, str) or not 0 < len(value) <= codec.limits().max_id_length:
        return None
    if value.isascii() and value.isprintable():  # the common case (uuids), without a regex
        return value
    return None if _CONTROL_RE.search(value) else value


def _actor(data: object) -> ActorRef:
    """``ActorRef.from_dict``, remembering recent actors (the same few act in many messages)."""
    if isinstance(data, dict) and len(data) <= 3:
        key = (data.get("type"), data.get("id"), data.get("display"), len(data))
        found = _actors.get(key)
        if found is not None:
            return found
        actor = ActorRef.from_dict(data)  # validates (and refuses unknown keys)
        if len(_actors) >= 1024:
            _actors.clear()
        _actors[key] = actor
        return actor
    return ActorRef.from_dict(data)


_actors: dict[tuple[object, ...], ActorRef] = {}


def seal(body: dict[str, Any], *, signing_key: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Check the size of ``body`` and sign it in place when a key is given; returns ``body``.

    Raises :class:`InvalidContext` when its canonical encoding is larger than ``max_bytes``.
    """
    text = codec.dumps(body)
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidContext(
            "context",
            f"needs {size} bytes in a message header; the limit is {max_bytes}: make meta smaller, "
            "or raise max_header_bytes (RabbitMQ refuses header frames over ~128 KiB)",
        )
    if signing_key is not None:
        body[SIGNATURE_FIELD] = codec.sign(text, signing_key)
    return body


def decode_wire(
    raw: object, *, keys: tuple[bytes, ...] = (), max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, Any]:
    """Validate a received header value and return the fields it carries.

    ``raw`` may be the dict itself or its JSON text (``str`` or ``bytes``). The result maps field
    names to validated values (``actor`` is an :class:`ActorRef`), ready for
    :class:`AuditContext`. Raises :class:`UntrustedContext` when ``keys`` are given and the value
    is unsigned or its signature matches none of them, and :class:`InvalidContext` for anything
    malformed (not JSON, wrong types, unknown version or fields, over ``max_bytes``).
    """
    data: object = raw
    if type(data) is dict:  # the usual case: a header deserialized by kombu
        pass
    elif isinstance(data, (bytes, bytearray)):
        if len(data) > max_bytes:
            raise InvalidContext("header", f"is {len(data)} bytes long; the limit is {max_bytes}")
        try:
            data = bytes(data).decode()
        except UnicodeDecodeError as exc:
            raise InvalidContext("header", "is not valid UTF-8") from exc
    if isinstance(data, str):  # JSON text: from inject(), or a header sent as text
        if len(data) > max_bytes or len(data.encode()) > max_bytes:
            raise InvalidContext("header", f"is {len(data.encode())} bytes long; the limit is {max_bytes}")
        try:
            data = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidContext("header", "is not valid JSON") from exc
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidContext("header", f"must be a JSON object, got {type(data).__name__}")
    if ERROR_FIELD in data:
        error = data[ERROR_FIELD]
        detail = error[:160] if isinstance(error, str) else "no reason given"
        raise InvalidContext("header", f"was not encoded by its publisher ({detail})")
    body = (
        {key: value for key, value in data.items() if key != SIGNATURE_FIELD}
        if SIGNATURE_FIELD in data
        else data
    )
    if keys:
        try:
            text = codec.dumps(body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidContext("header", "holds values that JSON cannot carry") from exc
        size = len(text.encode())
        if size > max_bytes:
            raise InvalidContext("header", f"is {size} bytes long; the limit is {max_bytes}")
        signature = data.get(SIGNATURE_FIELD)
        if signature is None:
            raise UntrustedContext("header is not signed")
        if not codec.verify(text, signature, keys):
            raise UntrustedContext("header has a signature that matches none of the signing keys")
    version = body.get("v")
    if version != codec.VERSION or isinstance(version, bool):
        raise InvalidContext(
            "v", f"unsupported version {version!r}; this release reads version {codec.VERSION}"
        )
    if not _CARRIED.issuperset(body):
        names = sorted(str(name)[:40] for name in set(body) - _CARRIED)[:3]
        raise InvalidContext("header", f"has fields that are not carried: {names}")
    # Every field is validated and capped on its own (ids 256 characters, meta 4 KiB), which
    # also bounds the whole: no need to re-encode an unsigned header to measure it.
    fields: dict[str, Any] = {}
    for name in codec.TEXT_FIELDS:
        value = body.get(name)
        if value is not None:
            fields[name] = codec.check_text(name, value)
    meta = body.get("meta")
    if meta is not None:
        fields["meta"] = codec.check_mapping("meta", meta)
    actor = body.get("actor")
    if actor is not None:
        fields["actor"] = _actor(actor)
    return fields


def inject(
    carrier: MutableMapping[str, str],
    ctx: AuditContext | None = None,
    *,
    signing_key: str | bytes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> MutableMapping[str, str]:
    """Put ``ctx`` (default: the current context) into ``carrier`` under ``"threadline"``.

    The value is compact JSON text (encode it for byte-valued headers such as Kafka's). Its
    ``causation_id`` is the sender: the current job's id, else the request id. Nothing is written
    when the context is empty. With ``signing_key`` the value carries an
    HMAC-SHA256 signature that :func:`extract` checks. Raises :class:`InvalidContext` when the
    encoding is larger than ``max_bytes``. Returns ``carrier``.
    """
    ctx = current() if ctx is None else ctx
    if ctx.is_empty:
        return carrier
    key = None if signing_key is None else codec.signing_key(signing_key)
    body = wire_dict(ctx)
    cause = sender_id(ctx)
    if cause is not None:
        body["causation_id"] = cause
    seal(body, signing_key=key, max_bytes=max_bytes)
    carrier[HEADER] = codec.dumps(body)
    return carrier


def extract(
    carrier: Mapping[str, Any],
    *,
    signing_keys: Iterable[str | bytes] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> AuditContext | None:
    """The context a producer put into ``carrier`` with :func:`inject`; ``None`` when absent.

    Only the carried fields are set (actor, correlation, request and causation ids, meta): layer
    the consumer's own on top, e.g. ``threadline.context(origin="rq", job={...})`` inside
    ``threadline.use_context(ctx)``. Raises :class:`InvalidContext` for a malformed value and,
    when ``signing_keys`` are given, :class:`UntrustedContext` for an unsigned or forged one.
    """
    raw = carrier.get(HEADER)
    if raw is None:
        return None
    return AuditContext(**decode_wire(raw, keys=check_signing_keys(signing_keys), max_bytes=max_bytes))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
