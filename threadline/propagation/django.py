"""Django: the request middleware and the ORM bridge (psycopg 3 backend).

Set-up (``settings.py``)::

    INSTALLED_APPS = [..., "threadline"]            # the ORM bridge (threadline.apps.ThreadlineConfig)
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "threadline.propagation.django.ThreadlineMiddleware",     # after authentication
        ...,
    ]
    THREADLINE = {                                  # every key is optional
        "CORRELATION_HEADERS": ["X-Correlation-ID", "X-Request-ID"],
        "RESPONSE_HEADER": "X-Correlation-ID",      # None: no echo
        "MAX_ID_LENGTH": 128,
        "CORRELATION_FROM_TRACEPARENT": False,      # True: a W3C traceparent's trace id, after the headers
        "ACTOR_RESOLVER": "threadline.propagation.django.default_actor_resolver",
        "CLIENT_ADDRESS": True,                     # meta["client"] = REMOTE_ADDR
        "ORM_BRIDGE": True,
        "COMMAND_CONTEXT": True,                    # manage.py commands: origin "cli", a correlation id
        "COMMAND_ACTOR": None,                      # e.g. "system:ops" for those writes
        "TRACK": {"shop.Order": {"mask": ["card_number"]}},  # tracked after every migrate
        "TRACK_ON_MIGRATE": True,
        "AUDIT_SCHEMA": "threadline",
    }

**Middleware**: the same request context as :class:`threadline.propagation.web.WSGIMiddleware`
(``origin="web"``, fresh ``request_id``, validated or generated ``correlation_id``, echoed on the
response), with the actor from ``request.user`` by default (``ActorRef.user(str(pk))``; an
anonymous user gives ``ActorRef.anonymous()``). Sync and async stacks are both supported. The
context is restored when the response is returned, or for a streaming response when Django closes
it after the last chunk.

**ORM bridge**: when Django opens a PostgreSQL connection (``connection_created``), its psycopg
connection becomes a :class:`~threadline.propagation.psycopg.ThreadlineConnection` and its cursors
:class:`~threadline.propagation.psycopg.ThreadlineCursor` subclasses of Django's own. So every
transaction carries the current context: inside ``atomic()`` the ``BEGIN`` that psycopg would send
anyway carries a ``SET LOCAL`` in the same message, and in autocommit mode the ``SET LOCAL`` and the
statement travel as one simple query (Django binds parameters client-side; with the
``server_side_binding`` option the setting is pipelined with the statement instead); no extra
round trip either way. ORM saves, ``bulk_create``,
``QuerySet.update()``/``delete()`` and raw ``connection.cursor()`` SQL are all covered; it works
with any backend built on ``django.db.backends.postgresql`` (PostGIS included) and with Django's
connection pool. Without a current context nothing at all is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import psycopg
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.utils.module_loading import import_string

from threadline.core.actor import ActorRef
from threadline.core.context import AuditContext, _current
from threadline.core.errors import ConfigurationError
from threadline.propagation.psycopg import bridge
from threadline.propagation.web import _client_from_environ, _reset_token
from threadline.propagation.web_request import (
    DEFAULT_CORRELATION_HEADERS,
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_RESPONSE_HEADER,
    CorrelationPolicy,
    _resolve_actor,
    build_context,
)

__all__ = [
    "ThreadlineMiddleware",
    "ThreadlineSettings",
    "bridge_connection",
    "default_actor_resolver",
    "install",
    "installed",
    "load_settings",
    "uninstall",
]

logger = logging.getLogger("threadline.web")

_KEYS = {
    "CORRELATION_HEADERS",
    "RESPONSE_HEADER",
    "MAX_ID_LENGTH",
    "CORRELATION_FROM_TRACEPARENT",
    "ACTOR_RESOLVER",
    "CLIENT_ADDRESS",
    "ORM_BRIDGE",
    "COMMAND_CONTEXT",
    "COMMAND_ACTOR",
    "TRACK",
    "TRACK_ON_MIGRATE",
    "AUDIT_SCHEMA",
}


def _audit_schema(value: Any) -> str:
    from threadline.core.errors import SchemaError
    from threadline.ddl.names import check_schema_name

    try:
        return check_schema_name(value)
    except SchemaError as exc:
        raise ConfigurationError(f"THREADLINE['AUDIT_SCHEMA']: {exc}") from exc


def _command_actor(value: Any) -> ActorRef | None:
    from threadline.core import fields
    from threadline.core.errors import InvalidActor

    try:
        return fields.check_actor(value)
    except InvalidActor as exc:
        raise ConfigurationError(f"THREADLINE['COMMAND_ACTOR'] is not an actor: {exc}") from exc


def default_actor_resolver(request: Any) -> ActorRef | None:
    """``ActorRef.user(str(request.user.pk))``; ``ActorRef.anonymous()`` for an anonymous user.

    ``None`` when the request has no ``user`` (``AuthenticationMiddleware`` is not installed or
    runs after :class:`ThreadlineMiddleware`).
    """
    return _actor_of(getattr(request, "user", None))


async def _default_actor_async(request: Any) -> ActorRef | None:
    """:func:`default_actor_resolver` in async code, with ``request.auser()`` awaited; as for any
    resolver, a failure is logged and the request runs without an actor."""
    try:
        return _actor_of(await request.auser())
    except Exception:
        logger.exception("threadline: the actor resolver failed; the request runs without an actor")
        return None


def _actor_of(user: Any) -> ActorRef | None:
    if user is None:
        return None
    if not user.is_authenticated:
        return ActorRef.anonymous()
    return ActorRef.user(str(user.pk))


@dataclass(frozen=True)
class ThreadlineSettings:
    """The ``THREADLINE`` Django setting, validated (see the module docs for the keys)."""

    correlation_headers: tuple[str, ...] = DEFAULT_CORRELATION_HEADERS
    response_header: str | None = DEFAULT_RESPONSE_HEADER
    max_id_length: int = DEFAULT_MAX_ID_LENGTH
    correlation_from_traceparent: bool = False
    actor_resolver: Callable[[Any], ActorRef | str | None] | None = default_actor_resolver
    client_address: bool = True
    orm_bridge: bool = True
    command_context: bool = True
    command_actor: ActorRef | None = None
    track: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    track_on_migrate: bool = True
    audit_schema: str = "threadline"


OPTION_NAMES = ("mask", "exclude", "keys")


def parse_track_setting(value: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    """``THREADLINE["TRACK"]`` validated: ``{"app_label.Model": {"mask": (...), ...}}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("THREADLINE['TRACK'] must map 'app_label.Model' to its options (a dict)")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for model, options in value.items():
        if not isinstance(model, str) or model.count(".") != 1 or "" in model.split("."):
            raise ConfigurationError(f"THREADLINE['TRACK']: name models as 'app_label.Model', got {model!r}")
        options = options or {}
        if not isinstance(options, Mapping) or set(options) - set(OPTION_NAMES):
            raise ConfigurationError(
                f"THREADLINE['TRACK'][{model!r}] takes the options {', '.join(OPTION_NAMES)}, got {options!r}"
            )
        parsed: dict[str, tuple[str, ...]] = {}
        for name in OPTION_NAMES:
            names = options.get(name) or ()
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ConfigurationError(f"THREADLINE['TRACK'][{model!r}][{name!r}] must be a list of names")
            parsed[name] = tuple(names)
        out[model] = parsed
    return out


def _flag(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):  # "false" (from an environment variable, say) would be true
        raise ConfigurationError(f"THREADLINE[{key!r}] must be True or False, got {value!r}")
    return value


def load_settings() -> ThreadlineSettings:
    """Read and validate ``settings.THREADLINE`` (missing: every default)."""
    raw = getattr(settings, "THREADLINE", None) or {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"settings.THREADLINE must be a dict, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigurationError(
            f"unknown settings.THREADLINE keys {sorted(unknown)}; the accepted keys are {sorted(_KEYS)}"
        )
    resolver = raw.get("ACTOR_RESOLVER", default_actor_resolver)
    if isinstance(resolver, str):
        try:
            resolver = import_string(resolver)
        except ImportError as exc:
            raise ConfigurationError(
                f"THREADLINE['ACTOR_RESOLVER'] = {resolver!r} cannot be imported: {exc}"
            ) from exc
    if resolver is not None and not callable(resolver):
        raise ConfigurationError(
            "THREADLINE['ACTOR_RESOLVER'] must be a callable, a dotted path to one, or None"
        )
    headers = raw.get("CORRELATION_HEADERS", DEFAULT_CORRELATION_HEADERS)
    if isinstance(headers, str) or not isinstance(headers, Sequence):
        raise ConfigurationError("THREADLINE['CORRELATION_HEADERS'] must be a list of header names")
    conf = ThreadlineSettings(
        correlation_headers=tuple(headers),
        response_header=raw.get("RESPONSE_HEADER", DEFAULT_RESPONSE_HEADER),
        max_id_length=raw.get("MAX_ID_LENGTH", DEFAULT_MAX_ID_LENGTH),
        correlation_from_traceparent=_flag(raw, "CORRELATION_FROM_TRACEPARENT", False),
        actor_resolver=resolver,
        client_address=_flag(raw, "CLIENT_ADDRESS", True),
        orm_bridge=_flag(raw, "ORM_BRIDGE", True),
        command_context=_flag(raw, "COMMAND_CONTEXT", True),
        command_actor=_command_actor(raw.get("COMMAND_ACTOR")),
        track=parse_track_setting(raw.get("TRACK")),
        track_on_migrate=_flag(raw, "TRACK_ON_MIGRATE", True),
        audit_schema=_audit_schema(raw.get("AUDIT_SCHEMA", "threadline")),
    )
    _policy(conf)  # validates
    return conf


def _policy(conf: ThreadlineSettings) -> CorrelationPolicy:
    return CorrelationPolicy(
        conf.correlation_headers,
        conf.response_header,
        conf.max_id_length,
        from_traceparent=conf.correlation_from_traceparent,
    )


class ThreadlineMiddleware:
    """Django middleware: each request runs under its own audit context (see the module docs).

    Put it after ``AuthenticationMiddleware`` so that the default resolver sees ``request.user``.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.apps import apps
        from django.core.exceptions import ImproperlyConfigured

        if not apps.is_installed("threadline"):
            raise ImproperlyConfigured(
                "ThreadlineMiddleware needs 'threadline' in INSTALLED_APPS: without it Django's "
                "database connections do not carry the request's context, so web writes would have "
                "no actor (tasks would). Add it (THREADLINE['ORM_BRIDGE'] = False keeps the bridge off)."
            )
        conf = load_settings()
        self.get_response = get_response
        self.policy = _policy(conf)
        self.actor_resolver = conf.actor_resolver
        self.client_address = conf.client_address
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        """Serve one request under its audit context."""
        if self._async:
            return self.__acall__(request)
        token = _current.set(self._context(request, _resolve_actor(self.actor_resolver, request)))
        try:
            response = self.get_response(request)
        except BaseException:
            _current.reset(token)
            raise
        return self._finish(response, token)

    async def __acall__(self, request: Any) -> Any:
        """The async twin of :meth:`__call__`.

        ``request.user`` is loaded lazily with a database query, which Django refuses in async
        code: the default resolver awaits ``request.auser()``, a custom one runs in a thread.
        """
        if self.actor_resolver is default_actor_resolver and hasattr(request, "auser"):
            actor: ActorRef | str | None = await _default_actor_async(request)
        else:
            actor = await sync_to_async(_resolve_actor)(self.actor_resolver, request)
        token = _current.set(self._context(request, actor))
        try:
            response = await self.get_response(request)
        except BaseException:
            _current.reset(token)
            raise
        return self._finish(response, token)

    def _context(self, request: Any, actor: ActorRef | str | None) -> AuditContext:
        meta = request.META
        correlation_id = self.policy.from_environ(meta)
        request.correlation_id = correlation_id
        return build_context(
            actor,
            correlation_id,
            _client_from_environ(meta) if self.client_address else None,
        )

    def _finish(self, response: Any, token: Token[AuditContext]) -> Any:
        header = self.policy.response_header
        if header is not None:
            response[header] = _current.get().correlation_id or ""
        if getattr(response, "streaming", False):
            # the body is produced after we return: keep the context until Django closes it
            response._resource_closers.append(lambda: _reset_token(token))
        else:
            _current.reset(token)
        return response


# -- ORM bridge -------------------------------------------------------------------------------

_DISPATCH_UID = "threadline.orm_bridge"
_state = {"installed": False}


def bridge_connection(connection: Any) -> None:
    """Make one open Django PostgreSQL connection carry the audit context (idempotent).

    ``connection`` is a Django ``DatabaseWrapper`` (``django.db.connection``); the ORM bridge calls
    this for every new connection. Raises :class:`~threadline.core.errors.ConfigurationError` for a
    psycopg2 connection.
    """
    pg = connection.connection
    if pg is None:
        return
    if not isinstance(pg, psycopg.Connection):
        raise ConfigurationError(
            f"database {connection.alias!r} uses {type(pg).__module__}.{type(pg).__name__}: threadline's "
            "Django ORM bridge needs the psycopg 3 driver (pip install 'psycopg[binary]'), "
            "or set THREADLINE = {'ORM_BRIDGE': False}"
        )
    bridge(pg)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor == "postgresql":
        bridge_connection(connection)


def install() -> None:
    """Bridge every Django PostgreSQL connection, open now or opened later (idempotent).

    Called by ``threadline.apps.ThreadlineConfig.ready()`` (``"threadline"`` in
    ``INSTALLED_APPS``) unless ``THREADLINE["ORM_BRIDGE"]`` is false.
    """
    from django.db import connections
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, dispatch_uid=_DISPATCH_UID, weak=False)
    _state["installed"] = True
    for conn in connections.all(initialized_only=True):
        if conn.vendor == "postgresql" and conn.connection is not None:
            bridge_connection(conn)


def uninstall() -> None:
    """Undo :func:`install`: connections opened from now on are not bridged (one already open
    keeps carrying the context until Django closes it)."""
    from django.db.backends.signals import connection_created

    connection_created.disconnect(dispatch_uid=_DISPATCH_UID)
    _state["installed"] = False


def installed() -> bool:
    """True while :func:`install` is in force (new connections are bridged)."""
    return _state["installed"]
