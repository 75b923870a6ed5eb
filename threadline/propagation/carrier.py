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

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from threadline.core import codec
from threadline.core.actor import FORBIDDEN_TEXT_RE, ActorRef
from threadline.core.context import AuditContext, current
from threadline.core.errors import ConfigurationError, InvalidContext, UntrustedContext
from threadline.core.fields import ALL_FIELDS, TEXT_FIELDS, VERSION, check_mapping, check_text, dumps, limits

HEADER = "threadline"
"""The key (message header name) the context travels under."""

SIGNATURE_FIELD = "sig"
BINDING_FIELD = "msg"
"""In a signed header: the message it was signed for (a digest of the message or task id)."""
EXPIRY_FIELD = "exp"
"""In a signed header: when its signature stops being accepted (Unix time, whole seconds)."""
DEFAULT_SIGNATURE_TTL = 7 * 24 * 3600
"""Default lifetime of a header's signature, in seconds: a week, for tasks queued with a delay."""
ERROR_FIELD = "error"
DEFAULT_MAX_BYTES = 8192
"""Default cap of a carried context's encoding: far under RabbitMQ's header-frame limit."""

# set by the receiving side only: where the work runs, and why it refused what it received
_LOCAL_FIELDS = ("origin", "job", "incoming_error")
_CARRIED = frozenset({"v", BINDING_FIELD, EXPIRY_FIELD, *ALL_FIELDS}) - set(_LOCAL_FIELDS)
_CARRIED_TEXT = ("correlation_id", "request_id", "causation_id")
_CARRIED_TEXT_CHECKED = tuple(name for name in TEXT_FIELDS if name in _CARRIED)


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
    text = dumps(body)
    _check_size(text, max_bytes)
    if signing_key is not None:
        body[SIGNATURE_FIELD] = codec.sign(text, signing_key)
    return body


def binding(message_id: str) -> str:
    """What a signed header carries to name the message it belongs to: 16 hex digits of the
    SHA-256 of its id (finding another id with the same digits is not practical)."""
    return hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


# A signed header in canonical form ends with its signature and then the version, the last key:
# ...,"sig":"hmac-sha256:<64 hex digits>","v":1}
_VERSION_TAIL = f',"v":{VERSION}}}'
_SIGNED_LEAD = f',"{SIGNATURE_FIELD}":"{codec.SIGNATURE_PREFIX}'.encode()
_SIGNED_TAIL = f'"{_VERSION_TAIL}'.encode()
_HEX_DIGITS = 64


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def decode_wire(
    raw: object,
    *,
    keys: tuple[bytes, ...] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    message_id: str | None = None,
    require_binding: bool | None = None,
) -> dict[str, Any]:
    """Validate a received header value and return the fields it carries.

    ``raw`` may be the JSON text (``str`` or ``bytes``; what threadline publishes) or the dict
    itself. The result maps field names to validated values (``actor`` is an
    :class:`ActorRef`), ready for :class:`AuditContext`. Raises :class:`UntrustedContext` when
    ``keys`` are given and the value is unsigned or its signature matches none of them, and
    :class:`InvalidContext` for anything malformed (not JSON, wrong types, unknown version or
    fields, over ``max_bytes``). With ``keys``, a header bound to a message (``msg``) is trusted
    only on the message ``message_id`` names and before it expires (``exp``); a signed header
    bound to no message is not trusted either when ``require_binding`` (default: when
    ``message_id`` is given).
    """
    if require_binding is None:
        require_binding = message_id is not None
    data: object = raw
    if type(data) is not dict and isinstance(data, (str, bytes, bytearray)):
        encoded = _utf8(data, max_bytes)
        if keys:
            signed = _signed_part(encoded)
            # The signature is checked over exactly the bytes that are then decoded. Anything
            # else (another layout, a signature that does not match) takes the general path.
            if signed is not None and codec.verify(signed[0], signed[1], keys):
                body = _body(_parse(signed[0]))
                _check_binding(body, message_id, require_binding)
                return _fields(body)
        data = _parse(encoded)
    body = _body(data)
    signature = None
    if SIGNATURE_FIELD in body:
        unsigned = dict(body)
        signature = unsigned.pop(SIGNATURE_FIELD)
        body = unsigned
    if keys:
        try:
            text = dumps(body).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidContext("header", "holds values that JSON cannot carry") from exc
        if len(text) > max_bytes:
            raise InvalidContext("header", f"is {len(text)} bytes long; the limit is {max_bytes}")
        if signature is None:
            raise UntrustedContext("header is not signed")
        if not codec.verify(text, signature, keys):
            raise UntrustedContext("header has a signature that matches none of the signing keys")
        _check_binding(body, message_id, require_binding)
    return _fields(body)


def _check_binding(body: Mapping[str, Any], message_id: str | None, require_binding: bool) -> None:
    """Refuse a verified header copied from another message, or signed too long ago."""
    bound = body.get(BINDING_FIELD)
    if bound is None:
        if require_binding:
            raise UntrustedContext(
                "header is signed but not bound to its message (a copied or old-style header)"
            )
    elif (
        message_id is None
        or not isinstance(bound, str)
        or not hmac.compare_digest(bound, binding(message_id))
    ):
        raise UntrustedContext("header is bound to another message (a copied header)")
    expires = body.get(EXPIRY_FIELD)
    if bound is not None or expires is not None:
        if type(expires) is not int:
            raise UntrustedContext("header has no valid expiry")
        if expires < time.time():
            raise UntrustedContext(f"header expired {int(time.time()) - expires} s ago")


def _utf8(value: str | bytes | bytearray, max_bytes: int) -> bytes:
    """The UTF-8 bytes of a header sent as text, within the size cap."""
    if len(value) > max_bytes:  # a str never has fewer bytes than characters
        size = len(value) if isinstance(value, (bytes, bytearray)) else len(value.encode(errors="replace"))
        raise InvalidContext("header", f"is {size} bytes long; the limit is {max_bytes}")
    if isinstance(value, str):
        try:
            value = value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidContext("header", "is not valid UTF-8") from exc
        if len(value) > max_bytes:
            raise InvalidContext("header", f"is {len(value)} bytes long; the limit is {max_bytes}")
    return bytes(value)


def _signed_part(encoded: bytes) -> tuple[bytes, str] | None:
    """(the signed bytes, the signature) of a signed header in canonical form, else ``None``."""
    end = len(encoded) - len(_SIGNED_TAIL)
    start = end - _HEX_DIGITS - len(_SIGNED_LEAD)
    if start <= 0 or not encoded.endswith(_SIGNED_TAIL) or not encoded.startswith(_SIGNED_LEAD, start):
        return None
    signature = encoded[start + len(_SIGNED_LEAD) - len(codec.SIGNATURE_PREFIX) : end]
    return encoded[:start] + encoded[end + 1 :], signature.decode("ascii", "replace")


def _parse(encoded: bytes) -> object:
    try:
        text = encoded.decode()
    except UnicodeDecodeError as exc:
        raise InvalidContext("header", "is not valid UTF-8") from exc
    try:
        data, end = _DECODER.raw_decode(text)  # canonical text: no whitespace around it
        if end == len(text):
            return data
    except (ValueError, RecursionError):
        pass
    try:  # whitespace around the value is allowed; anything else after it is not
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidContext("header", "is not valid JSON") from exc


def _body(data: object) -> Mapping[str, Any]:
    """``data`` as the header's mapping; a publisher's error marker is refused."""
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidContext("header", f"must be a JSON object, got {type(data).__name__}")
    if ERROR_FIELD in data:
        error = data[ERROR_FIELD]
        detail = error[:160] if isinstance(error, str) else "no reason given"
        raise InvalidContext("header", f"was not encoded by its publisher ({detail})")
    return data


def _fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the carried fields of a header (without its signature); see :func:`decode_wire`."""
    version = body.get("v")
    if version != VERSION or isinstance(version, bool):
        raise InvalidContext("v", f"unsupported version {version!r}; this release reads version {VERSION}")
    if not _CARRIED.issuperset(body):
        names = sorted(str(name)[:40] for name in set(body) - _CARRIED)[:3]
        raise InvalidContext("header", f"has fields that are not carried: {names}")
    # Every field is validated and capped on its own (ids 256 characters, meta 4 KiB), which
    # also bounds the whole: no need to re-encode an unsigned header to measure it.
    fields: dict[str, Any] = {}
    limit = limits().max_id_length
    for name in _CARRIED_TEXT_CHECKED:
        value = body.get(name)
        if value is not None:
            if type(value) is str and 0 < len(value) <= limit and value.isascii() and value.isprintable():
                fields[name] = value  # the common case (ASCII ids), without the full check
            else:
                fields[name] = check_text(name, value)
    meta = body.get("meta")
    if meta is not None:
        fields["meta"] = check_mapping("meta", meta)
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
