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
from collections.abc import Iterable, Iterator, Sequence
from contextvars import Token
from typing import Any

from threadline.core.context import AuditContext, _current
from threadline.core.errors import ConfigurationError
from threadline.propagation.web_request import (
    _VALID_ID,
    DEFAULT_CORRELATION_HEADERS,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_RESPONSE_HEADER,
    TRACEPARENT_HEADER,
    ActorResolver,
    ASGIApp,
    CorrelationPolicy,
    Message,
    Receive,
    Scope,
    Send,
    StartResponse,
    WSGIApp,
    WSGIEnviron,
    _resolve_actor,
    bind_actor,
    build_context,
    trace_id_from_traceparent,
)

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


def _client_from_environ(environ: Any) -> str | None:
    addr = environ.get("REMOTE_ADDR")
    return addr if isinstance(addr, str) and 0 < len(addr) <= 64 and _VALID_ID.fullmatch(addr) else None


class _ClosingBody:
    """The WSGI body: runs under the request's context, and so does its ``close()`` (where
    frameworks run their close-time callbacks, Flask's ``call_on_close``). The previous context
    is restored when the body is exhausted or fails, so that nothing leaks into the thread when a
    caller never closes it (a test client), and again after ``close()``."""

    __slots__ = ("_body", "_ctx", "_iter", "_token")

    def __init__(self, body: Iterable[bytes], token: Token[AuditContext], ctx: AuditContext) -> None:
        self._body = body
        self._ctx = ctx
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
            if self._token is not None:  # close() runs under it as the app left it (bind_actor)
                self._ctx = _current.get()
            self._reset()
            raise

    def close(self) -> None:
        """Close the app's body (WSGI ``close()``) under the request's context, then restore the
        previous context."""
        if self._token is None:  # exhausted first, as servers do: back under it for the close
            self._token = _current.set(self._ctx)
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
        return _ClosingBody(body, token, ctx)


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
