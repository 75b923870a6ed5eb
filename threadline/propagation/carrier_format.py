"""The layout of a carried context header: its key, its fields and limits, and the rules both sides share.

Both the sending side (:mod:`threadline.propagation.carrier_encoding`) and the receiving side
(:mod:`threadline.propagation.carrier_decoding`) read it: which fields travel, the digest that binds
a signed header to its message, and the validation of signing keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from threadline.core import codec
from threadline.core.errors import ConfigurationError
from threadline.core.fields import ALL_FIELDS, TEXT_FIELDS, VERSION

HEADER = "threadline"
"""The key (message header name) the context travels under."""

SIGNATURE_FIELD = "sig"
"""In a signed header: the HMAC-SHA256 signature over the canonical JSON text of the rest."""
BINDING_FIELD = "msg"
"""In a signed header: the message it was signed for (a digest of the message or task id)."""
EXPIRY_FIELD = "exp"
"""In a signed header: when its signature stops being accepted (Unix time, whole seconds)."""
DEFAULT_SIGNATURE_TTL = 7 * 24 * 3600
"""Default lifetime of a header's signature, in seconds: a week, for tasks queued with a delay."""
ERROR_FIELD = "error"
"""In a header its publisher could not encode: why (a receiver refuses such a header)."""
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


def binding(message_id: str) -> str:
    """What a signed header carries to name the message it belongs to: 16 hex digits of the
    SHA-256 of its id (finding another id with the same digits is not practical)."""
    return hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# A signed header in canonical form ends with its signature and then the version, the last key:
# ...,"sig":"hmac-sha256:<64 hex digits>","v":1}
_VERSION_TAIL = f',"v":{VERSION}}}'
