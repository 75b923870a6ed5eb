"""The one canonical encoding of an :class:`~threadline.context.AuditContext`.

The same JSON object travels into PostgreSQL (the ``threadline.context`` setting) and, later, in
Celery message headers. It is compact, key-sorted JSON with a version field ``v``; fields that are
not set are left out. Decoding validates every field, so a value that came from outside can never
turn into a wrong actor.

Signing (:func:`sign`, :func:`verify`) is an HMAC-SHA256 over that canonical text, for carriers
whose other end should refuse a context it cannot trust.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from threadline.actor import FORBIDDEN_TEXT, FORBIDDEN_TEXT_RE, ActorRef
from threadline.errors import ConfigurationError, InvalidActor, InvalidContext

if TYPE_CHECKING:
    from threadline.context import AuditContext

VERSION = 1
TEXT_FIELDS = ("correlation_id", "request_id", "causation_id", "origin", "incoming_error")
MAPPING_FIELDS = ("job", "meta")
ALL_FIELDS = ("actor", *TEXT_FIELDS, *MAPPING_FIELDS)

_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    """Size limits applied when contexts are built, encoded and decoded."""

    max_id_length: int = 256
    """Longest accepted correlation/request/causation id, origin, actor id or meta key."""
    max_meta_bytes: int = 4096
    """Largest accepted canonical JSON encoding of ``meta`` (and of ``job``)."""
    max_encoded_bytes: int = 8192
    """Largest accepted canonical encoding of a whole context (well under header-frame limits)."""


_limits = Limits()


def limits() -> Limits:
    """The limits in force."""
    return _limits


def set_limits(**changes: int) -> Limits:
    """Change one or more limits process-wide (e.g. ``set_limits(max_meta_bytes=8192)``)."""
    global _limits
    for name, value in changes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"limit {name} must be a positive integer, got {value!r}")
    _limits = replace(_limits, **changes)
    return _limits


def _mapping_as_dict(value: Any) -> Any:
    """JSON for read-only mappings (a context's ``job``/``meta`` are ``MappingProxyType``)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_mapping_as_dict
)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept, NaN/Infinity refused."""
    return _ENCODER.encode(value)


def check_text(field: str, value: Any) -> str | None:
    """Validate one short text field (ids, origin): a string, capped, no control characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidContext(field, f"must be a string, got {type(value).__name__}")
    if value == "":
        raise InvalidContext(field, "must not be empty (leave it unset instead)")
    if len(value) > _limits.max_id_length:
        raise InvalidContext(field, f"is {len(value)} characters long; the limit is {_limits.max_id_length}")
    if not (value.isascii() and value.isprintable()) and FORBIDDEN_TEXT_RE.search(
        value
    ):  # regex only off ASCII
        raise InvalidContext(field, f"contains {FORBIDDEN_TEXT}")
    return value


def _check_json_tree(field: str, value: Any, depth: int = 0) -> None:
    if depth > 16:
        raise InvalidContext(field, "is nested more than 16 levels deep")
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE_RE.search(value):
            raise InvalidContext(
                field, "contains an unpaired surrogate, which is not text (not encodable as UTF-8)"
            )
        return
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidContext(field, "contains NaN or Infinity, which JSON cannot carry")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidContext(field, f"has a non-string key {key!r}")
            if len(key) > _limits.max_id_length or FORBIDDEN_TEXT_RE.search(key):
                raise InvalidContext(
                    field, f"has an over-long key or a key with {FORBIDDEN_TEXT}: {key[:40]!r}"
                )
            _check_json_tree(field, item, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json_tree(field, item, depth + 1)
        return
    raise InvalidContext(field, f"holds a {type(value).__name__}, which is not JSON-serialisable")


def check_mapping(field: str, value: Any) -> dict[str, Any] | None:
    """Validate ``job``/``meta``: a JSON-serialisable mapping whose encoding fits the cap."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidContext(field, f"must be a mapping, got {type(value).__name__}")
    _check_json_tree(field, value)
    plain = json.loads(dumps(value))
    size = len(dumps(plain).encode())
    if size > _limits.max_meta_bytes:
        raise InvalidContext(field, f"encodes to {size} bytes; the limit is {_limits.max_meta_bytes}")
    return plain  # type: ignore[no-any-return]


def check_actor(value: Any) -> ActorRef | None:
    """Accept an :class:`ActorRef`, a ``"type:id"`` string or an actor dict."""
    if value is None or isinstance(value, ActorRef):
        return value
    if isinstance(value, str):
        return ActorRef.parse(value)
    if isinstance(value, Mapping):
        return ActorRef.from_dict(dict(value))
    raise InvalidActor(f"expected an ActorRef, 'type:id' text or a dict, got {type(value).__name__}")


def to_dict(ctx: AuditContext) -> dict[str, Any]:
    """The JSON-compatible dict form of a context (with ``v``), unset fields left out."""
    out: dict[str, Any] = {"v": VERSION}
    if ctx.actor is not None:
        out["actor"] = ctx.actor.to_dict()
    for name in TEXT_FIELDS:
        value = getattr(ctx, name)
        if value is not None:
            out[name] = value
    for name in MAPPING_FIELDS:
        value = getattr(ctx, name)
        if value is not None:
            out[name] = dict(value)
    return out


def encode(ctx: AuditContext) -> str:
    """Canonical JSON text of a context; raises :class:`InvalidContext` if it is too large."""
    try:
        text = dumps(to_dict(ctx))
    except (TypeError, ValueError) as exc:
        raise InvalidContext("context", f"cannot be encoded as JSON: {exc}") from exc
    size = len(text.encode())
    if size > _limits.max_encoded_bytes:
        raise InvalidContext("context", f"encodes to {size} bytes; the limit is {_limits.max_encoded_bytes}")
    return text


def from_dict(data: Any) -> AuditContext:
    """Rebuild and validate a context from its dict form (as produced by :func:`to_dict`)."""
    from threadline.context import AuditContext

    if not isinstance(data, Mapping):
        raise InvalidContext("context", f"must be a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if version != VERSION or isinstance(version, bool):
        raise InvalidContext("v", f"unsupported version {version!r}; this release reads version {VERSION}")
    unknown = set(data) - {"v", *ALL_FIELDS}
    if unknown:
        raise InvalidContext("context", f"unknown fields {sorted(unknown)[:5]}")
    return AuditContext(
        actor=ActorRef.from_dict(data["actor"]) if data.get("actor") is not None else None,
        **{name: data.get(name) for name in (*TEXT_FIELDS, *MAPPING_FIELDS)},
    )


def decode(text: str | bytes) -> AuditContext:
    """Parse canonical JSON text back into a validated context."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise InvalidContext("context", "is not valid UTF-8") from exc
    if not isinstance(text, str):
        raise InvalidContext("context", f"must be JSON text, got {type(text).__name__}")
    if len(text.encode()) > _limits.max_encoded_bytes:
        raise InvalidContext("context", f"is larger than {_limits.max_encoded_bytes} bytes")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidContext("context", f"is not valid JSON: {exc}") from exc
    return from_dict(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


SIGNATURE_PREFIX = "hmac-sha256:"


def signing_key(key: str | bytes) -> bytes:
    """Validate one signing key and return its bytes (text keys are UTF-8 encoded)."""
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise ConfigurationError(f"a signing key must be str or bytes, got {type(key).__name__}")
    if len(key) < 16:
        raise ConfigurationError(
            f"a signing key must be at least 16 bytes long, got {len(key)}: "
            "use e.g. secrets.token_urlsafe(32)"
        )
    return key


def sign(text: str, key: bytes) -> str:
    """The signature of canonical ``text`` with ``key``: ``"hmac-sha256:<hex digest>"``."""
    return SIGNATURE_PREFIX + _mac(key, text.encode()).hex()


def verify(text: str | bytes, signature: object, keys: Iterable[bytes]) -> bool:
    """True when ``signature`` is a valid signature of ``text`` by any of ``keys`` (rotation).

    ``text`` is the canonical text, or exactly the bytes that were signed (its UTF-8 encoding).
    """
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        return False
    try:
        given = bytes.fromhex(signature[len(SIGNATURE_PREFIX) :])
    except ValueError:
        return False
    data = text.encode() if isinstance(text, str) else text
    for key in keys:  # noqa: SIM110 - a loop, not a generator: this runs for every task
        if hmac.compare_digest(_mac(key, data), given):
            return True
    return False


def _mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` with ``key`` (the same bytes as ``hmac.digest(key, data, "sha256")``).

    The keyed state (the hashes of the padded key) is computed once per key and copied for each
    message, where ``hmac.digest`` sets the key up again on every call.
    """
    state = _keyed.get(key)
    if state is None:
        state = hmac.new(key, digestmod=hashlib.sha256)
        if len(_keyed) >= 64:
            _keyed.clear()
        _keyed[key] = state
    copy = state.copy()
    copy.update(data)
    return copy.digest()


_keyed: dict[bytes, hmac.HMAC] = {}
