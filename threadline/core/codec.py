"""The one canonical encoding of an :class:`~threadline.core.context.AuditContext`.

The same JSON object travels into PostgreSQL (the ``threadline.context`` setting) and, later, in
Celery message headers. It is compact, key-sorted JSON with a version field ``v``; fields that are
not set are left out. Decoding validates every field, so a value that came from outside can never
turn into a wrong actor. What each field may hold, and the limits, are in
:mod:`threadline.core.fields` (``set_limits`` is importable from here too).

Signing (:func:`sign`, :func:`verify`) is an HMAC-SHA256 over that canonical text, for carriers
whose other end should refuse a context it cannot trust.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from threadline.core.context import AuditContext
from threadline.core.errors import ConfigurationError
from threadline.core.fields import Limits, dumps, limits, set_limits

__all__ = [
    "SIGNATURE_PREFIX",
    "Limits",
    "decode",
    "dumps",
    "encode",
    "from_dict",
    "limits",
    "set_limits",
    "sign",
    "signing_key",
    "to_dict",
    "verify",
]


def to_dict(ctx: AuditContext) -> dict[str, Any]:
    """The JSON-compatible dict form of a context (with ``v``), unset fields left out."""
    return ctx.to_dict()


def encode(ctx: AuditContext) -> str:
    """Canonical JSON text of a context; raises :class:`InvalidContext` if it is too large."""
    return ctx.to_json()


def from_dict(data: Any) -> AuditContext:
    """Rebuild and validate a context from its dict form (as produced by :func:`to_dict`)."""
    return AuditContext.from_dict(data)


def decode(text: str | bytes) -> AuditContext:
    """Parse canonical JSON text back into a validated context."""
    return AuditContext.from_json(text)


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
