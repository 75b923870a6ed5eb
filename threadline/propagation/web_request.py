"""What a web request's audit context is made of: the correlation id chosen from the incoming
headers (:class:`CorrelationPolicy`, untrusted ids refused), the trace id of a W3C
``traceparent``, the actor a resolver returns or :func:`bind_actor` sets, and the context built
from them. The middleware that applies it is :mod:`threadline.propagation.web`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any, Protocol

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.context import AuditContext, _current
from threadline.core.errors import ConfigurationError, InvalidContext

logger = logging.getLogger("threadline.web")

DEFAULT_CORRELATION_HEADERS: tuple[str, ...] = ("X-Correlation-ID", "X-Request-ID")
"""Incoming headers tried in order for the correlation id."""
DEFAULT_RESPONSE_HEADER = "X-Correlation-ID"
"""Response header that echoes the request's correlation id."""
DEFAULT_MAX_ID_LENGTH = 128
_ID_CHARS = r"A-Za-z0-9._:/+=@-"
_VALID_ID = re.compile("[" + _ID_CHARS + "]+")
_VALID_ID_BYTES = re.compile(b"[" + _ID_CHARS.encode() + b"]+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 token
TRACEPARENT_HEADER = "traceparent"
"""The W3C trace-context header whose trace id ``correlation_from_traceparent`` uses."""
_TRACEPARENT_ENVIRON_KEY = "HTTP_TRACEPARENT"
_TRACEPARENT_NAME = b"traceparent"
# W3C trace-context, version 00: version-trace_id-parent_id-flags, lowercase hex only (55 chars)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_TRACEPARENT_BYTES = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16
_urandom = os.urandom
_VARIANT = "89ab"

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ActorResolver(Protocol):
    """``actor_resolver(environ_or_scope) -> ActorRef | None`` (``"type:id"`` text is accepted)."""

    def __call__(self, request: Any, /) -> ActorRef | str | None: ...  # pragma: no cover


def bind_actor(actor: ActorRef | str | None) -> AuditContext:
    """Set the actor of the current request's context for the rest of the request.

    For frameworks that authenticate inside the app, after the middleware ran (a Flask
    ``before_request`` hook, an ``async`` FastAPI dependency, a Django REST framework view): the
    middleware's reset at the end of the request undoes it. Returns the new current context.
    """
    ctx = _current.get()
    # the mappings are passed as plain dicts: a read-only mapping proxy is not re-encodable
    ctx = ctx.merged(
        actor=actor,
        meta=None if ctx.meta is None else dict(ctx.meta),
        job=None if ctx.job is None else dict(ctx.job),
    )
    _current.set(ctx)
    return ctx


def trace_id_from_traceparent(value: str | bytes) -> str | None:
    """The trace id of a W3C trace-context ``traceparent`` header value, or ``None``.

    Strict: version ``00`` only, exactly 55 characters (``00-<32 hex>-<16 hex>-<2 hex>``, hex in
    lower case, no surrounding spaces), trace id and parent id not all zero.
    """
    if isinstance(value, bytes):
        found = _TRACEPARENT_BYTES.fullmatch(value)
        if found is None:
            return None
        trace_id, parent_id = found.group(1).decode("ascii"), found.group(2).decode("ascii")
    else:
        text = _TRACEPARENT.fullmatch(value) if isinstance(value, str) else None
        if text is None:
            return None
        trace_id, parent_id = text.group(1), text.group(2)
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return trace_id


class CorrelationPolicy:
    """Reads, validates and generates correlation ids; shared by the WSGI, ASGI and Django entries.

    ``headers``: incoming header names tried in order; ``response_header``: the echo header
    (``None``: no echo); ``max_id_length``: longest accepted incoming id. ``from_traceparent``:
    when none of ``headers`` holds a valid id, use the trace id of a valid W3C ``traceparent``
    header (see :func:`trace_id_from_traceparent`) before generating one; it needs
    ``max_id_length`` of 32 or more.
    """

    __slots__ = (
        "_ascii_names",
        "_wanted_names",
        "environ_keys",
        "from_traceparent",
        "headers",
        "max_id_length",
        "response_header",
    )

    def __init__(
        self,
        headers: Sequence[str] = DEFAULT_CORRELATION_HEADERS,
        response_header: str | None = DEFAULT_RESPONSE_HEADER,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        *,
        from_traceparent: bool = False,
    ) -> None:
        if isinstance(headers, str):
            headers = (headers,)
        for name in [*headers, *([response_header] if response_header is not None else [])]:
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"{name!r} is not a valid HTTP header name: use letters, digits and '-' "
                    "(for example 'X-Correlation-ID')"
                )
        if (
            not isinstance(max_id_length, int)
            or isinstance(max_id_length, bool)
            or not 8 <= max_id_length <= 256
        ):
            raise ConfigurationError(f"max_id_length must be an integer from 8 to 256, got {max_id_length!r}")
        if not isinstance(from_traceparent, bool):
            raise ConfigurationError(f"from_traceparent must be True or False, got {from_traceparent!r}")
        if from_traceparent and max_id_length < 32:
            raise ConfigurationError(
                f"from_traceparent takes 32-character trace ids: max_id_length must be 32 or more, "
                f"got {max_id_length}"
            )
        self.headers = tuple(headers)
        self.response_header = response_header
        self.max_id_length = max_id_length
        self.from_traceparent = from_traceparent
        self.environ_keys = tuple("HTTP_" + h.upper().replace("-", "_") for h in self.headers)
        self._ascii_names = tuple(h.lower().encode("ascii") for h in self.headers)
        # the ASGI header names collected in one pass over the request's headers
        self._wanted_names = self._ascii_names + ((_TRACEPARENT_NAME,) if from_traceparent else ())

    def check(self, header: str, value: str) -> str | None:
        """``value`` if it is an acceptable correlation id, else ``None`` (and one warning)."""
        if len(value) <= self.max_id_length and _VALID_ID.fullmatch(value):
            return value
        self._refused(header, value)
        return None

    def from_environ(self, environ: Any) -> str:
        """The correlation id for a WSGI ``environ`` (or Django ``request.META``)."""
        get = environ.get
        for key, header in zip(self.environ_keys, self.headers, strict=True):
            value = get(key)
            if value is not None:
                checked = self.check(header, value)
                if checked is not None:
                    return checked
        if self.from_traceparent:
            value = get(_TRACEPARENT_ENVIRON_KEY)
            # a server joins repeated headers with commas: two traceparents never parse
            trace_id = None if value is None else self._traceparent_id(value)
            if trace_id is not None:
                return trace_id
        return new_id()

    def from_asgi_headers(self, raw: Iterable[tuple[bytes, bytes]]) -> str:
        """The correlation id from ASGI ``scope["headers"]`` (lower-case names, raw bytes)."""
        wanted = self._wanted_names
        found: dict[bytes, bytes] | None = None
        repeated_traceparent = False
        for name, value in raw:
            if name in wanted:
                if found is None:
                    found = {}
                if name not in found:
                    found[name] = value
                elif name == _TRACEPARENT_NAME:  # W3C trace-context: a repeated traceparent is invalid
                    repeated_traceparent = True
        if found is not None:
            for name, header in zip(self._ascii_names, self.headers, strict=True):
                raw_value = found.get(name)
                if raw_value is None:
                    continue
                if len(raw_value) <= self.max_id_length and _VALID_ID_BYTES.fullmatch(raw_value):
                    return raw_value.decode("ascii")
                self._refused(header, raw_value)
            if self.from_traceparent:
                traceparent = found.get(_TRACEPARENT_NAME)
                if repeated_traceparent:
                    self._refused_traceparent(None)
                elif traceparent is not None:
                    trace_id = self._traceparent_id(traceparent)
                    if trace_id is not None:
                        return trace_id
        return new_id()

    def _traceparent_id(self, value: str | bytes) -> str | None:
        trace_id = trace_id_from_traceparent(value)
        if trace_id is None:
            self._refused_traceparent(value)
        return trace_id

    def _refused_traceparent(self, value: str | bytes | None) -> None:
        reason = (
            "it was sent more than once"
            if value is None
            else "it is not a version-00 W3C trace-context value with non-zero ids"
        )
        logger.warning(
            "threadline: ignored the incoming %s header because %s; a new correlation id is used: %r",
            TRACEPARENT_HEADER,
            reason,
            None if value is None else value[:64],
        )

    def _refused(self, header: str, value: str | bytes) -> None:
        if not value:
            reason = "it is empty"
        elif len(value) > self.max_id_length:
            reason = f"it is {len(value)} characters long (limit {self.max_id_length})"
        else:
            reason = f"it holds characters outside [{_ID_CHARS}]"
        # %r escapes CR/LF and every non-printable character; the value is truncated as well
        logger.warning(
            "threadline: ignored the incoming %s header because %s; a new correlation id is used: %r",
            header,
            reason,
            value[:64],
        )


def _resolve_actor(resolver: ActorResolver | None, request: Any) -> ActorRef | str | None:
    if resolver is None:
        return None
    try:
        return resolver(request)
    except Exception:  # an auth hiccup must not break the request: the transaction has no actor
        logger.exception("threadline: the actor resolver failed; the request runs without an actor")
        return None


def new_id() -> str:
    """A random (version 4) UUID in its canonical text form, built without the ``uuid`` module's
    object overhead (this runs twice per request)."""
    h = _urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def build_context(actor: ActorRef | str | None, correlation_id: str, client: str | None) -> AuditContext:
    """The context of one web request (``origin="web"``, fresh ``request_id``).

    ``correlation_id`` and ``client`` must have been checked by :class:`CorrelationPolicy` /
    the client-address check (safe characters, bounded length); the actor is validated here.
    """
    try:
        checked = fields.check_actor(actor)
    except InvalidContext as exc:  # a resolver returned something that is not an actor
        logger.error("threadline: the actor resolver returned an invalid actor (%s); ignored", exc.problem)
        checked = None
    # Every field is valid by construction: skip the generic validation (it costs more than the
    # rest of the middleware together).
    return AuditContext._unchecked(
        actor=checked,
        correlation_id=correlation_id,
        request_id=new_id(),
        origin="web",
        meta=None if client is None else {"client": client},
    )
