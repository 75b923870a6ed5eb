"""Reading a carried context header: its signature, message binding and expiry, and its validated fields."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from threadline.core import codec
from threadline.core.actor import ActorRef
from threadline.core.errors import InvalidContext, UntrustedContext
from threadline.core.fields import VERSION, check_mapping, check_text, dumps, limits
from threadline.propagation.carrier_format import (
    _CARRIED,
    _CARRIED_TEXT_CHECKED,
    _VERSION_TAIL,
    BINDING_FIELD,
    DEFAULT_MAX_BYTES,
    ERROR_FIELD,
    EXPIRY_FIELD,
    SIGNATURE_FIELD,
    binding,
)

# A signed header in canonical form ends with its signature and then the version, the last key:
# ...,"sig":"hmac-sha256:<64 hex digits>","v":1}
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
    if not _CARRIED.issuperset(body) and not _retry_of_a_refused_header(body):
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
    if "incoming_error" in body:
        fields["incoming_error"] = check_text("incoming_error", body["incoming_error"])
    return fields


def _retry_of_a_refused_header(body: Mapping[str, Any]) -> bool:
    """True for the header a task sends when it retries after its own header was refused: why
    (``incoming_error``) beside the ids it ran with, and no actor or meta, so that the retry's
    transactions say why as well. Any other header that sets a receiver's field is refused."""
    return (
        _CARRIED_WITH_REASON.issuperset(body)
        and "incoming_error" in body
        and "actor" not in body
        and "meta" not in body
    )


def _actor(data: object) -> ActorRef:
    """``ActorRef.from_dict``, remembering recent actors (the same few act in many messages)."""
    # only an actor of known keys holding texts is remembered, keyed by all it holds: anything
    # else (an unknown key, a list where a text belongs) is validated, and refused, every time
    if (
        type(data) is dict
        and len(data) <= 3
        and _ACTOR_KEYS.issuperset(data)
        and all(value is None or type(value) is str for value in data.values())
    ):
        key = tuple(sorted(data.items()))
        found = _actors.get(key)
        if found is not None:
            return found
        actor = ActorRef.from_dict(data)  # validates (and refuses unknown keys)
        if len(_actors) >= 1024:
            _actors.clear()
        _actors[key] = actor
        return actor
    return ActorRef.from_dict(data)


_ACTOR_KEYS = frozenset({"type", "id", "display"})
_CARRIED_WITH_REASON = _CARRIED | {"incoming_error"}
_actors: dict[tuple[object, ...], ActorRef] = {}
