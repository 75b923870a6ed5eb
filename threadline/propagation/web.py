"""Web entry: WSGI and ASGI middleware that give every request its audit context.

No framework is needed; Flask, Django, FastAPI/Starlette and any other WSGI or ASGI app work::

    app = WSGIMiddleware(app, actor_resolver=lambda environ: ...)      # WSGI
    app = ASGIMiddleware(app, actor_resolver=lambda scope: ...)        # ASGI

For each HTTP request the middleware makes an :class:`~threadline.core.context.AuditContext` current
with ``origin="web"``, a fresh ``request_id`` (UUID), the ``correlation_id`` taken from the first
valid incoming header of ``correlation_headers`` (default ``X-Correlation-ID`` then
``X-Request-ID``) or a generated UUID, the client address in ``meta["client"]``, and the actor
that ``actor_resolver(environ | scope)`` returns. The correlation id is echoed on the response
(``response_header``). When the response is over the previous context is restored exactly:

- WSGI: after the body iterable is exhausted or closed (streaming bodies run under the request's
  context), or at once when the app raises.
- ASGI ``http``: when the app returns or raises (streaming included: it has sent the body by then).
- ASGI ``websocket``: the connection gets a context like a request (the id is echoed on
  ``websocket.accept``) that lasts as long as the connection.
- ASGI ``lifespan`` and any other scope type pass through untouched, with no context.

With ``correlation_from_traceparent=True`` the trace id of a valid W3C ``traceparent`` header
(version ``00``: 32 lowercase hex digits, not all zero) is the correlation id when none of
``correlation_headers`` holds a valid id: an explicit correlation header wins, then
``traceparent``, then a generated UUID. A ``traceparent`` that is malformed, of another version,
with an all-zero trace or parent id, or sent twice, is ignored (with one warning).

Incoming ids are untrusted: an id longer than ``max_id_length`` (default 128), empty, or holding
any character outside ``A-Z a-z 0-9 . _ : / + = @ -`` (so CR/LF, spaces, quotes and non-printable
bytes) is replaced by a generated one, and one warning is logged with the bad value escaped
(``repr``) and truncated. A refused value never reaches a response header or a log line as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextvars import Token
from typing import Any, Protocol

from threadline.core import fields
from threadline.core.actor import ActorRef
from threadline.core.context import AuditContext, _current
from threadline.core.errors import ConfigurationError, InvalidContext

__all__ = [
    "DEFAULT_CORRELATION_HEADERS",
    "DEFAULT_RESPONSE_HEADER",
    "TRACEPARENT_HEADER",
    "ASGIMiddleware",
    "CorrelationPolicy",
    "WSGIMiddleware",
    "bind_actor",
    "trace_id_from_traceparent",
]

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
            if value is not None:
                # a server joins repeated headers with commas: two traceparents never parse
                trace_id = trace_id_from_traceparent(value)
                if trace_id is not None:
                    return trace_id
                self._refused_traceparent(value)
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
                    trace_id = trace_id_from_traceparent(traceparent)
                    if trace_id is not None:
                        return trace_id
                    self._refused_traceparent(traceparent)
        return new_id()

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


def _client_from_environ(environ: Any) -> str | None:
    addr = environ.get("REMOTE_ADDR")
    return addr if isinstance(addr, str) and 0 < len(addr) <= 64 and _VALID_ID.fullmatch(addr) else None


class _ClosingBody:
    """The WSGI body: runs under the request's context; restores the previous one when done."""

    __slots__ = ("_body", "_iter", "_token")

    def __init__(self, body: Iterable[bytes], token: Token[AuditContext]) -> None:
        self._body = body
        self._iter: Iterator[bytes] | None = None
        self._token: Token[AuditContext] | None = token

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = iter(self._body)
        try:
            return next(self._iter)
        except BaseException:  # exhausted or failed: the context ends with the body
            self._reset()
            raise

    def close(self) -> None:
        """Close the app's body (WSGI ``close()``), then restore the previous context."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._reset()

    def _reset(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            _reset_token(token)


def _reset_token(token: Token[AuditContext]) -> None:
    with contextlib.suppress(ValueError):  # closed from another Context: nothing of ours is set there
        _current.reset(token)


class _Middleware:
    """What the WSGI and ASGI middleware share: validated options and the correlation policy."""

    def __init__(
        self,
        protocol: str,
        app: object,
        actor_resolver: ActorResolver | None,
        correlation_headers: Sequence[str],
        response_header: str | None,
        max_id_length: int,
        client_address: bool,
        correlation_from_traceparent: bool,
    ) -> None:
        name = type(self).__name__
        if not callable(app):
            raise ConfigurationError(
                f"{name} wraps a callable {protocol} application, got {type(app).__name__}"
            )
        if actor_resolver is not None and not callable(actor_resolver):
            argument = "environ" if protocol == "WSGI" else "scope"
            raise ConfigurationError(f"actor_resolver must be a callable taking the {protocol} {argument}")
        self.actor_resolver = actor_resolver
        self.policy = CorrelationPolicy(
            correlation_headers,
            response_header,
            max_id_length,
            from_traceparent=correlation_from_traceparent,
        )
        self.client_address = client_address


class WSGIMiddleware(_Middleware):
    """WSGI middleware: each request runs under its own audit context (see the module docs).

    ``actor_resolver(environ)`` returns the acting :class:`~threadline.core.actor.ActorRef` (or
    ``None``); it runs before the wrapped app, so it can only use what the request carries
    (``REMOTE_USER``, a token header...). When the app authenticates later, call
    :func:`bind_actor` from inside it. ``client_address=False`` leaves ``meta["client"]`` out.
    ``correlation_from_traceparent=True`` takes the correlation id from a valid W3C
    ``traceparent`` header when no correlation header gives one (see the module docs).
    """

    def __init__(
        self,
        app: WSGIApp,
        actor_resolver: ActorResolver | None = None,
        *,
        correlation_headers: Sequence[str] = DEFAULT_CORRELATION_HEADERS,
        response_header: str | None = DEFAULT_RESPONSE_HEADER,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        client_address: bool = True,
        correlation_from_traceparent: bool = False,
    ) -> None:
        super().__init__(
            "WSGI",
            app,
            actor_resolver,
            correlation_headers,
            response_header,
            max_id_length,
            client_address,
            correlation_from_traceparent,
        )
        self.app = app
        self._echo = response_header

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request under its audit context."""
        correlation_id = self.policy.from_environ(environ)
        ctx = build_context(
            _resolve_actor(self.actor_resolver, environ),
            correlation_id,
            _client_from_environ(environ) if self.client_address else None,
        )
        echo = self._echo
        if echo is not None:
            inner = start_response

            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                headers.append((echo, correlation_id))
                return inner(status, headers, exc_info) if exc_info is not None else inner(status, headers)

        token = _current.set(ctx)
        try:
            body = self.app(environ, start_response)
        except BaseException:
            _current.reset(token)
            raise
        if type(body) is list:  # already complete: nothing runs after this
            _current.reset(token)
            return body
        return _ClosingBody(body, token)


class ASGIMiddleware(_Middleware):
    """ASGI 3 middleware: each HTTP request and websocket runs under its own audit context.

    ``actor_resolver(scope)`` returns the acting :class:`~threadline.core.actor.ActorRef` (or
    ``None``). Lifespan (and unknown) scopes pass through untouched. The other options are
    :class:`WSGIMiddleware`'s. See the module docs.
    """

    def __init__(
        self,
        app: ASGIApp,
        actor_resolver: ActorResolver | None = None,
        *,
        correlation_headers: Sequence[str] = DEFAULT_CORRELATION_HEADERS,
        response_header: str | None = DEFAULT_RESPONSE_HEADER,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        client_address: bool = True,
        correlation_from_traceparent: bool = False,
    ) -> None:
        super().__init__(
            "ASGI",
            app,
            actor_resolver,
            correlation_headers,
            response_header,
            max_id_length,
            client_address,
            correlation_from_traceparent,
        )
        self.app = app
        self._echo = None if response_header is None else response_header.lower().encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one connection; ``http`` and ``websocket`` scopes under their audit context."""
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        correlation_id = self.policy.from_asgi_headers(scope.get("headers") or ())
        client = None
        if self.client_address:
            peer = scope.get("client")
            if peer and isinstance(peer[0], str) and len(peer[0]) <= 64 and _VALID_ID.fullmatch(peer[0]):
                client = peer[0]
        ctx = build_context(_resolve_actor(self.actor_resolver, scope), correlation_id, client)
        echo = self._echo
        if echo is not None:
            start = "http.response.start" if kind == "http" else "websocket.accept"
            value = correlation_id.encode("ascii")
            inner = send

            async def send(message: Message) -> None:
                if message["type"] == start:
                    message["headers"] = [*message.get("headers", ()), (echo, value)]
                await inner(message)

        token = _current.set(ctx)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
