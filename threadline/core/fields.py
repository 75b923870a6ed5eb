"""What each field of an audit context may hold, its limits, and the canonical JSON they are
written in: the checks the context, its encoding and every carrier share."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from threadline.core.actor import FORBIDDEN_TEXT, FORBIDDEN_TEXT_RE, ActorRef
from threadline.core.errors import InvalidActor, InvalidContext

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
